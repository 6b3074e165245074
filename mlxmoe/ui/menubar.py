"""Menu-bar app: a plain state model, and a thin rumps layer that draws it.

`MenubarState.from_status()` turns the router's /status JSON plus this Mac's
facts into what the menu shows; `title()` and `items()` are pure, so the
whole menu is tested on Linux. `run_menubar()` only polls, rebuilds the state
and redraws; rumps is imported inside it (macOS only, `mlxmoe[menubar]`).
"""

from __future__ import annotations

import shlex
import socket
import sys
import webbrowser
from dataclasses import dataclass, field

from mlxmoe.errors import MlxMoeError
from mlxmoe.ui import base_url, fetch_status

POLL_S = 3.0


class MenubarUnavailable(MlxMoeError):
    """This system cannot show a menu-bar app."""

    status, code = 501, "unsupported"


@dataclass
class MenuItem:
    title: str
    enabled: bool = True
    action: str | None = None  # what the click does; None for info lines


def session_counts(sessions: list[dict]) -> dict:
    """The router's sessions counted as the status page counts them:
    generating now; active (generating, or used within the router's active
    window: its `active` flag); kept (idle, kept for a later turn). A router
    without the flag counts every session as active."""
    active = sum(bool(x.get("active", True)) for x in sessions)
    return {"generating": sum(bool(x.get("generating")) for x in sessions), "active": active,
            "kept": len(sessions) - active}


def _is_mine(peer_name: str, node_name: str) -> bool:
    """Nodes advertise as `<host>-g<groups>-<port>` (mlxmoe.cluster.discovery);
    accept that, the bare host name, and Bonjour's `.local` forms, any case."""
    norm = lambda s: s.lower().removesuffix(".").removesuffix(".local")
    peer, me = norm(peer_name), norm(node_name)
    return peer == me or peer.startswith(me + "-g")


@dataclass
class MenubarState:
    url: str
    node_name: str
    reachable: bool = False
    error: str | None = None
    model: str | None = None
    peers_up: int = 0
    peers_total: int = 0
    node_state: str | None = None  # best state of this Mac's node(s): "up", "ignored", "down"; None: none
    node_groups: list[int] = field(default_factory=list)
    node_reason: str | None = None
    active_sessions: int = 0  # generating now or used in the last minute (session_counts)
    kept_sessions: int = 0  # idle, kept for a later turn
    generating: int = 0
    service_installed: bool = False

    @classmethod
    def from_status(cls, status: dict | None, *, url: str, node_name: str, service_installed: bool = False,
                    error: str | None = None) -> "MenubarState":
        """`status` None means the router could not be reached (`error` says why)."""
        st = cls(url=base_url(url), node_name=node_name, service_installed=service_installed, error=error)
        if status is None:
            return st
        peers = status.get("peers") or []
        mine = [p for p in peers if _is_mine(str(p.get("name", "")), node_name)]
        st.reachable = True
        st.model = status.get("model")
        st.peers_total = len(peers)
        st.peers_up = sum(p.get("state") == "up" for p in peers)
        counts = session_counts(status.get("sessions") or [])
        st.active_sessions, st.kept_sessions, st.generating = counts["active"], counts["kept"], counts["generating"]
        if mine:  # one Mac may run several nodes (groups): show them together
            states = [p.get("state") for p in mine]
            st.node_state = next((x for x in ("up", "ignored", "down") if x in states), states[0])
            st.node_groups = sorted({g for p in mine for g in p.get("groups") or []})
            st.node_reason = next((p.get("reason") for p in mine if p.get("reason")), None)
        return st

    @property
    def node_running(self) -> bool:
        return self.node_state in ("up", "ignored")

    def title(self) -> str:
        if not self.reachable:
            return "MoE –"
        warn = " ⚠" if self.peers_up < self.peers_total else ""
        return f"MoE {self.peers_up}/{self.peers_total}{warn}"

    def items(self) -> list[MenuItem]:
        if self.reachable:
            info = [MenuItem(f"{self.model or 'model ?'}", False),
                    MenuItem(f"Peers up: {self.peers_up} of {self.peers_total}", False)]
        else:
            info = [MenuItem(f"Router not reachable at {self.url}", False)]
            if self.error:
                info.append(MenuItem(self.error[:80], False))
        if self.node_state is None:
            node = "This Mac: not serving a group"
        else:
            groups = ", ".join(map(str, self.node_groups)) or "-"
            reason = f" ({self.node_reason})" if self.node_reason else ""
            node = f"This Mac: group {groups}, {self.node_state}{reason}"
        info += [MenuItem(node, False), MenuItem(f"Active sessions: {self.active_sessions}", False),
                 MenuItem(f"Kept sessions: {self.kept_sessions}", False)]
        if self.generating:
            info.append(MenuItem(f"Generating now: {self.generating}", False))
        # Start/Stop drive the login service, so without one there is nothing to start.
        hint = "" if self.service_installed else " (run `mlxmoe service install` first)"
        controls = [MenuItem("Start node" + hint, self.service_installed and not self.node_running, "start"),
                    MenuItem("Stop node", self.service_installed and self.node_running, "stop"),
                    MenuItem("Open chat", self.reachable, "chat"),
                    MenuItem("Open status page", self.reachable, "status_page")]
        return info + [MenuItem("-", False)] + controls

    def render_text(self) -> str:
        lines = [self.title()]
        for it in self.items():
            if it.title == "-":
                lines.append("  ----")
            else:
                lines.append(f"  {'[x]' if it.enabled and it.action else '[ ]' if it.action else '   '} {it.title}")
        return "\n".join(lines)


def current_state(url: str, node_name: str | None = None) -> MenubarState:
    """Poll the router once and build the state (the only I/O besides drawing)."""
    from mlxmoe.ui import service

    node_name = node_name or socket.gethostname()
    installed = service.controlled_role() is not None
    try:
        status, error = fetch_status(url), None
    except (OSError, ValueError) as e:
        status, error = None, str(e)
    return MenubarState.from_status(status, url=url, node_name=node_name, service_installed=installed, error=error)


def run_menubar(url: str, node_name: str | None = None) -> None:
    if sys.platform != "darwin":
        raise MenubarUnavailable("The menu-bar app needs macOS (it uses rumps, a macOS-only library).")
    try:
        import rumps
    except ImportError:
        raise MenubarUnavailable("The menu-bar app needs rumps: pip install 'mlxmoe[menubar]'") from None
    import subprocess

    from mlxmoe.ui import service

    def open_chat():
        # A new Terminal window running the chat against the same router.
        cmd = f"{shlex.quote(sys.executable)} -m mlxmoe.cli chat --url {shlex.quote(base_url(url))}"
        script = 'tell application "Terminal" to do script "%s"' % cmd.replace("\\", "\\\\").replace('"', '\\"')
        subprocess.Popen(["osascript", "-e", script])

    def control(fn):
        if err := fn(service.controlled_role() or "node"):
            rumps.alert("mlxmoe", err)

    actions = {
        "start": lambda: control(service.start),
        "stop": lambda: control(service.stop),
        "chat": open_chat,
        "status_page": lambda: webbrowser.open(base_url(url) + "/"),
    }

    class App(rumps.App):
        def __init__(self):
            super().__init__("MoE –", quit_button=None)  # we redraw the whole menu, Quit included
            self.refresh(None)

        @rumps.timer(POLL_S)
        def refresh(self, _):
            st = current_state(url, node_name)
            self.title = st.title()
            self.menu.clear()
            for it in st.items():
                if it.title == "-":
                    self.menu.add(rumps.separator)
                    continue
                cb = (lambda _, a=it.action: actions[a]()) if it.enabled and it.action else None
                self.menu.add(rumps.MenuItem(it.title, callback=cb))
            self.menu.add(rumps.separator)
            self.menu.add(rumps.MenuItem("Quit", callback=rumps.quit_application))

    App().run()
