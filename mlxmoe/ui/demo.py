"""`mlxmoe demo`: the whole system on one machine, offline.

Splits the bundled reference model into groups (once; cached), starts one
node per group and a router on loopback with a demo cluster key, waits until
every node is up, then opens `mlxmoe chat` against them (or, with --ask,
asks one question and exits). Ctrl-C stops everything it started."""

from __future__ import annotations

from mlxmoe import ASSETS

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlxmoe.children import Children
from mlxmoe.errors import MlxMoeError

REFERENCE = ASSETS / "reference-moe"
# Three Macs of different sizes (docs/QUALITY.md, Layouts): what `calibrate --budgets 1x,1.5x,3x` finds on the
# reference model; the 3x node holds every expert, so a free one answers as the full model.
LAYOUTS = {3: ASSETS / "groupings" / "reference-moe-g3-layout-1x-1.5x-3x.json"}
# Three equal Macs, overlapping domain sets (the demo's layout before layouts were measured): no node holds
# every expert and each leans to a domain, so placement and migration have something to choose (tests,
# benchmarks).
EQUAL_LAYOUTS = {3: ASSETS / "groupings" / "reference-moe-g3-domain-sets29.json"}


def layout(n_groups: int, equal: bool = False) -> tuple[dict | None, dict | None]:
    """(grouping, overlay) the demo splits with: the shipped layout, else contiguous groups."""
    layouts = EQUAL_LAYOUTS if equal else LAYOUTS
    if n_groups not in layouts:
        return None, None
    d = json.loads(layouts[n_groups].read_text())
    return (d["grouping"], d["overlay"]) if "grouping" in d else (d, None)  # a layout, or a grouping alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_bundle(root: Path, n_groups: int, quiet: bool, equal: bool = False) -> Path:
    """Split the reference model once; reuse the bundle while it validates.
    `equal`: the layout for equal Macs (EQUAL_LAYOUTS) instead of the demo's unequal one."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.bundle.split import split

    out = root / f"reference-{n_groups}g{'-equal' if equal else ''}"
    grouping, overlay = layout(n_groups, equal)
    try:
        m = Manifest.load(out)
        m.verify_files(out, check_hash=False)
        if m.n_groups == n_groups and (grouping is None or (m.grouping == grouping and overlay in (None, m.overlay))):
            return out
    except MlxMoeError:
        pass
    if not quiet:
        print(f"splitting the bundled reference model into {n_groups} groups -> {out}", file=sys.stderr)
    split(str(REFERENCE), out, n_groups, overlay, grouping, bits=8, group_size=64, trunk_bits=8, kv_bits=8, force=True)
    return out


def ensure_key(root: Path) -> Path:
    """The demo's cluster key, CA and certificate (in `root`: nodes and router
    load them beside --key, and talk mutual TLS like a real cluster)."""
    from mlxmoe.cluster import tls
    from mlxmoe.cluster.keys import create_key

    key = root / "demo-cluster.key"
    if not key.exists():
        create_key(key)
    if not tls.Identity.in_dir(root).ca.exists():
        tls.create_ca(root)
    tls.ensure_identity(root, "demo", ["127.0.0.1", "localhost"])  # once, before the processes start
    return key


def wait_ready(url: str, n_nodes: int, children: "Children", timeout: float = 120) -> dict:
    """Until the router reports `n_nodes` nodes up. The router must be our child
    and listen on the URL's port: whatever else answers there is not the demo."""
    router, port = children.procs[-1], int(url.rsplit(":", 1)[1])
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        children.check()
        try:
            with urllib.request.urlopen(url + "/status", timeout=2) as r:
                status = json.load(r)
            if sum(p["state"] == "up" for p in status.get("peers", [])) >= n_nodes and listening(router.pid, port):
                children.check()
                return status
        except (OSError, ValueError, AttributeError, TypeError):  # not up yet, or not an mlxmoe router
            pass
        time.sleep(0.5)
    raise MlxMoeError(f"the demo cluster did not come up within {timeout:.0f}s (last status: {status})")


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` listens on TCP `port` (True where the system will not say)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    except psutil.AccessDenied:
        return True
    except psutil.Error:  # gone, or a zombie
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def on_signals(cleanup) -> None:
    """SIGTERM and SIGHUP (terminal closed) clean up, then exit 128+N; SIGINT
    stays KeyboardInterrupt (the chat stops an answer with it)."""
    def handler(signum, frame):
        cleanup()
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# --- the router's port, and where other commands find it -----------------------------

PREFERRED_PORT = 8000  # what chat, doctor and menubar try when no demo state is found


class PortInUse(MlxMoeError):
    """A --port another process holds."""


def port_in_use(port: int, host: str = "127.0.0.1") -> str:
    return f"port {port} on {host} is in use (another mlxmoe or another program); choose another with --port"


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """PortInUse when another process holds `port` on `host`; other bind errors
    (an address this Mac lacks) are left to the server to report."""
    import errno

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except OSError:
        return
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(port_in_use(port, host)) from None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the router binds: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def router_port(asked: int) -> int:
    """--port if given, else 8000 when free, else any free port."""
    if asked:
        return asked
    return PREFERRED_PORT if port_free(PREFERRED_PORT) else free_port()


def write_state(url: str) -> Path:
    from mlxmoe.ui import demo_state_path

    path = demo_state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def clear_state(url: str) -> None:
    """Remove the state file if it is still ours (a newer demo may own it)."""
    from mlxmoe.ui import demo_state_path

    path = demo_state_path()
    try:
        st = json.loads(path.read_text())
        if st.get("pid") == os.getpid() and st.get("url") == url:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def serve_forever(url: str, children: "Children") -> int:
    """--serve: keep the cluster up until a signal; chat from another terminal.
    A child that dies ends the demo (MlxMoeError): no half cluster stays up."""
    print(f"serving until Ctrl-C; in another terminal: mlxmoe chat (finds {url})", file=sys.stderr, flush=True)
    while True:
        children.check()
        time.sleep(1.0)


def run_demo(root, groups: int, port: int, ask: str | None, as_json: bool, mode: str, serve: bool = False) -> int:
    """Start `groups` nodes and a router on loopback, then chat (or ask once,
    or with `serve` just keep them up); returns the exit code. Everything
    started is stopped on the way out, on SIGTERM and SIGHUP too."""
    from mlxmoe.ui.chat import run_interactive, run_once

    if port:
        check_port(port)  # an explicit --port that is taken is an error, before any work
    root_p = Path(root).expanduser()
    (root_p / "logs").mkdir(parents=True, exist_ok=True)
    quiet = bool(ask and as_json)
    bundle = ensure_bundle(root_p, groups, quiet)
    key = ensure_key(root_p)
    ports = [free_port() for _ in range(groups)]
    peers = root_p / "peers.toml"
    peers.write_text("".join(f'[[peers]]\nurl = "https://127.0.0.1:{p}"\n\n' for p in ports))
    port = router_port(port)
    url = f"http://127.0.0.1:{port}"
    children = Children()
    done = []

    def cleanup():
        if not done:
            done.append(True)
            clear_state(url)
            children.stop()

    on_signals(cleanup)
    try:
        for g, p in enumerate(ports):
            children.start(["node", str(bundle), "--group", str(g), "--host", "127.0.0.1", "--port", str(p),
                            "--key", str(key), "--no-advertise"], root_p / "logs" / f"node-{g}.log")
        children.start(["serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--key", str(key),
                        "--peers", str(peers), "--no-mdns", "--mode", mode], root_p / "logs" / "router.log")
        if not quiet:
            print(f"starting {groups} nodes and a router (logs in {root_p / 'logs'}) ...", file=sys.stderr)
        wait_ready(url, groups, children)
        write_state(url)
        if not quiet:
            print(f"ready: OpenAI-compatible API at {url}/v1, status page at {url}/", file=sys.stderr, flush=True)
        if ask:
            rc = run_once(url, ask, model=None, system=None, as_json=as_json)
        elif serve:
            rc = serve_forever(url, children)
        else:
            rc = run_interactive(url, model=None, system=None)
    except KeyboardInterrupt:
        rc = 130
    finally:
        cleanup()
    return rc
