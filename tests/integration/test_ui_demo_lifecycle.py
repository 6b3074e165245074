"""`mlxmoe demo` stops every process it started: on SIGTERM, on SIGHUP (the
terminal closed) and when it is SIGKILLed (parent death); and its router's
URL is where `mlxmoe chat`, doctor and menubar look."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlxmoe import ui
from mlxmoe.ui import demo

ROOT = str(Path(__file__).resolve().parents[2])
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")


def table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) of every process, from ps (Linux and macOS)."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, timeout=10).stdout
    rows = (line.split() for line in out.splitlines())
    return {int(r[0]): (int(r[1]), r[2]) for r in rows if len(r) >= 3}


def alive(pid: int) -> bool:
    row = table().get(pid)
    return row is not None and not row[1].startswith("Z")  # a zombie serves nothing


def wait_gone(pids, timeout=20.0) -> list[int]:
    end = time.time() + timeout
    while time.time() < end:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return left


def children_of(pid: int) -> list[int]:
    return [p for p, (pp, st) in table().items() if pp == pid and not st.startswith("Z")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PYTHONPATH": ROOT, "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One split of the reference model for every demo below."""
    root = tmp_path_factory.mktemp("demo")
    demo.ensure_bundle(root, 2, quiet=True)
    return root


def start_demo(env, demo_dir, port) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlxmoe.cli", "demo", "--serve", "--groups", "2",
                             "--port", str(port), "--dir", str(demo_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_state(env, proc, timeout=240.0) -> dict:
    path = Path(env["XDG_CONFIG_HOME"]) / "mlxmoe" / "demo.json"
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.5)
    raise AssertionError("the demo did not come up")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=["term", "hup", "kill"])
def test_demo_stops_every_child(env, demo_dir, sig):
    port = free_port()
    proc = start_demo(env, demo_dir, port)
    try:
        state = wait_state(env, proc)
        assert state == {"url": f"http://127.0.0.1:{port}", "pid": proc.pid}
        kids = children_of(proc.pid)
        assert len(kids) == 3, kids  # 2 nodes + the router
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert wait_gone(kids) == [], "children left running"
        path = Path(env["XDG_CONFIG_HOME"]) / "mlxmoe" / "demo.json"
        if sig == signal.SIGKILL:
            # the file outlives a killed demo, but names a dead pid: nobody follows it
            assert path.exists()
            assert subprocess.run([sys.executable, "-c", "from mlxmoe.ui import demo_url; print(demo_url())"],
                                  env=env, capture_output=True, text=True, timeout=60).stdout.strip() == "None"
        else:
            assert proc.returncode == 128 + sig
            assert not path.exists()
        assert demo.port_free(port)  # the router's port is free again
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in children_of(proc.pid):
            os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(400)
def test_demo_serve_stops_when_a_child_dies(env, demo_dir):
    """--serve watches its children: one that dies ends the demo (non-zero), never a half cluster."""
    proc = start_demo(env, demo_dir, free_port())
    try:
        wait_state(env, proc)
        kids = children_of(proc.pid)
        import psutil
        node0 = next(p for p in kids if "--group 0 " in " ".join(psutil.Process(p).cmdline()))
        os.kill(node0, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert "Error: the demo's node 0 was killed by signal 9; log: " in err and "Traceback" not in err, err
        assert wait_gone(kids) == [], "children left running"
        assert not (Path(env["XDG_CONFIG_HOME"]) / "mlxmoe" / "demo.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- each parent-death mechanism alone, with a sleeping child ----------------------------

PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlxmoe import children
    if sys.argv[1] == "pipe":   # the macOS path: only the pipe watchdog
        children._pdeathsig = lambda parent: None
        children.CHILD_BOOT = "from mlxmoe.children import watch_parent; watch_parent(); import time; time.sleep(120)"
    else:                       # Linux's PR_SET_PDEATHSIG alone
        children.CHILD_BOOT = "import time; time.sleep(120)"
    kids = children.Children()
    p = kids.start([], Path(sys.argv[2]))
    print(p.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("how", ["pipe", pytest.param("pdeathsig", marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"))])
def test_child_dies_with_its_parent(env, tmp_path, how):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how, str(tmp_path / "child.log")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)  # the child is past its start (watchdog running, or prctl done)
        assert alive(child)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_gone([child], timeout=10) == []
    finally:
        if parent.poll() is None:
            parent.kill()


# --- ports and the state file ------------------------------------------------------------

def test_router_port_prefers_8000(monkeypatch):
    monkeypatch.setattr(demo, "port_free", lambda port, host="127.0.0.1": True)
    assert demo.router_port(0) == 8000
    monkeypatch.setattr(demo, "port_free", lambda port, host="127.0.0.1": False)
    p = demo.router_port(0)
    assert p != 8000 and 0 < p < 65536
    assert demo.router_port(1234) == 1234


def test_port_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not demo.port_free(s.getsockname()[1])
    assert demo.port_free(free_port())


def test_state_file_is_where_clients_look(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert ui.demo_url() is None and ui.default_url() == ui.DEFAULT_URL == "http://127.0.0.1:8000"
    path = demo.write_state("http://127.0.0.1:8123")
    assert path == tmp_path / "mlxmoe" / "demo.json"
    assert ui.demo_url() == "http://127.0.0.1:8123"
    assert ui.base_url(None) == ui.base_url("") == "http://127.0.0.1:8123"
    assert ui.base_url("h:1") == "http://h:1"  # --url / $MLXMOE_URL win
    demo.clear_state("http://127.0.0.1:9999")  # not ours: kept
    assert path.exists()
    demo.clear_state("http://127.0.0.1:8123")
    assert not path.exists() and ui.demo_url() is None


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"url": 5, "pid": 1}', '{"url": "http://x:1"}',
                                     '{"url": "http://x:1", "pid": 999999999}', '{"url": "http://x:1", "pid": "abc"}'])
def test_stale_or_broken_state_file_is_ignored(tmp_path, monkeypatch, content):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "mlxmoe").mkdir()
    (tmp_path / "mlxmoe" / "demo.json").write_text(content)
    assert ui.demo_url() is None and ui.base_url(None) == ui.DEFAULT_URL


def test_chat_and_doctor_find_the_demo(tmp_path):
    """`mlxmoe chat --once` and `doctor` with no --url reach the URL the demo wrote."""
    from ui_fake_server import FakeRouter

    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("MLXMOE_URL", None)
    with FakeRouter(tokens=["found", " you"]) as srv:
        (tmp_path / "mlxmoe").mkdir()
        # this test's own pid stands for the demo's: alive while the test runs
        (tmp_path / "mlxmoe" / "demo.json").write_text(json.dumps({"url": srv.url, "pid": os.getpid()}))
        r = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "chat", "--once", "hi"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "found you\n"
        r = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "doctor", "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert srv.url in r.stdout
        r = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "menubar", "--print"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "not reachable" not in r.stdout and "fake-moe-235b" in r.stdout, r.stdout
