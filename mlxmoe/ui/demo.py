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

from mlxmoe.errors import MlxMoeError

REFERENCE = ASSETS / "reference-moe"
# Three Macs of different sizes (docs/QUALITY.md, Layouts): what `calibrate --budgets 1x,1.5x,3x` finds on the
# reference model; the 3x node holds every expert, so a free one answers as the full model.
LAYOUTS = {3: ASSETS / "groupings" / "reference-moe-g3-layout-1x-1.5x-3x.json"}


def layout(n_groups: int) -> tuple[dict | None, dict | None]:
    """(grouping, overlay) the demo splits with: the shipped layout, else contiguous groups."""
    if n_groups not in LAYOUTS:
        return None, None
    d = json.loads(LAYOUTS[n_groups].read_text())
    return d["grouping"], d["overlay"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_bundle(root: Path, n_groups: int, quiet: bool) -> Path:
    """Split the reference model once; reuse the bundle while it validates."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.bundle.split import split

    out = root / f"reference-{n_groups}g"
    grouping, overlay = layout(n_groups)
    try:
        m = Manifest.load(out)
        m.verify_files(out, check_hash=False)
        if m.n_groups == n_groups and (grouping is None or (m.grouping == grouping and m.overlay == overlay)):
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


# --- children: started in their own process group, stopped with their parent -------------
# Three ways a child learns that the demo is gone (docs/ARCHITECTURE.md, ui):
#  1. the demo's SIGINT/SIGTERM/SIGHUP handler kills every child's process group;
#  2. Linux: prctl(PR_SET_PDEATHSIG, SIGTERM), set between fork and exec, so even
#     SIGKILL of the demo sends the children SIGTERM;
#  3. everywhere (macOS has no PDEATHSIG): each child holds the read end of a pipe
#     whose only write end the demo holds; a watchdog thread in the child reads it,
#     and EOF (the demo exited, however) makes the child SIGTERM itself.
PARENT_PIPE_ENV = "MLXMOE_PARENT_PIPE"
PR_SET_PDEATHSIG = 1
# Run by each child before the command line: start the watchdog, then `mlxmoe ...`.
CHILD_BOOT = ("import sys, runpy; from mlxmoe.ui.demo import watch_parent; watch_parent(); "
              "sys.argv[0] = 'mlxmoe'; runpy.run_module('mlxmoe.cli', run_name='__main__')")


def watch_parent() -> None:
    """In a child: if $MLXMOE_PARENT_PIPE names a pipe, SIGTERM ourselves when
    it reaches EOF (the parent died), and exit hard if SIGTERM did not end us."""
    import threading

    fd = os.environ.pop(PARENT_PIPE_ENV, None)
    if not fd or not fd.isdigit():
        return

    def watch():
        try:
            while os.read(int(fd), 1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, name="mlxmoe-parent-watch", daemon=True).start()


def _pdeathsig(parent: int):
    """preexec_fn (Linux): SIGTERM when the parent dies; exit if it already has."""
    import ctypes

    try:  # looked up here: between fork and exec nothing may import or allocate much
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


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


def last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class Children:
    """The demo's child processes, each in its own process group."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}  # pid -> its log
        self._r, self._w = os.pipe()  # the demo holds the only write end

    def check(self) -> None:
        """MlxMoeError naming the first child that exited, with its log's last line."""
        for p in self.procs:
            if p.poll() is None:
                continue
            args = [str(a) for a in p.args[3:]]
            what = ("router" if args[:1] == ["serve"] else
                    f"node {args[args.index('--group') + 1]}" if "--group" in args[:-1] else " ".join(args[:2]))
            log = self.logs.get(p.pid)
            if p.returncode < 0:
                why = f"was killed by signal {-p.returncode}"
            else:  # its own error is its log's last line
                tail = last_line(log).removeprefix("Error: ") if log else ""
                why = f"exited (exit code {p.returncode})" + (f": {tail}" if tail else "")
            raise MlxMoeError(f"the demo's {what} {why}" + (f"; log: {log}" if log else ""))

    def start(self, cmd: list[str], log: Path, boot: str | None = None) -> subprocess.Popen:
        """Run `boot` (default: CHILD_BOOT, i.e. `mlxmoe CMD`) with `cmd` as its arguments."""
        env = {**os.environ, PARENT_PIPE_ENV: str(self._r)}
        with open(log, "w") as out:
            p = subprocess.Popen([sys.executable, "-c", boot or CHILD_BOOT, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env, pass_fds=(self._r,),
                                 preexec_fn=_pdeathsig(os.getpid()) if sys.platform.startswith("linux") else None)
        self.procs.append(p)
        self.logs[p.pid] = log
        return p

    def stop(self, grace: float = 10) -> None:
        """SIGTERM every child's group, SIGKILL what is left after `grace` s."""
        for p in self.procs:
            _killpg(p, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p, signal.SIGKILL)
                p.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


def _killpg(p: subprocess.Popen, sig) -> None:
    try:
        os.killpg(p.pid, sig)  # its own group: whatever it started goes too
    except (ProcessLookupError, PermissionError):
        pass


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
