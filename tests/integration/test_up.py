"""`mlxmoe up` on loopback: three config homes ($MLXMOE_HOME) with --memory 64MB, 7MB and 6MB on the
bundled model come up with one command each (the first creates the cluster; the others join with a
token, get a part sized to their memory from the first Mac and serve it) and answer a chat; a member
restarted with a bare `mlxmoe up` serves the same part again without fetching it; a bad token is
refused in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fakes import free_ports
from mlxmoe.bundle.manifest import Manifest

pytestmark = pytest.mark.timeout(420)


class Mac:
    """One `mlxmoe up` with its own config home, output in a file."""

    def __init__(self, home: Path, args: list[str], log: str | None = None):
        self.home, self.log = home, home.parent / (log or f"{home.name}.log")
        env = {**os.environ, "MLXMOE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlxmoe.cli", "up", *args], env=env,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, self.output()[-2000:]
            assert time.time() < deadline, self.output()[-2000:]
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def port_free(port: int) -> bool:
    """Whether a new node could listen on `port` (as servers do, past connections in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def token(home: Path, port: int) -> str:
    out = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "token", "--host", "127.0.0.1", "--port", str(port)],
                         env={**os.environ, "MLXMOE_HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return next(w for w in out.stdout.split() if w.startswith("mlxmoe-"))


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as r:
        return json.load(r)


def test_three_macs_from_nothing_to_a_chat(tmp_path):
    router, join, *node = free_ports(5)
    a = Mac(tmp_path / "A", ["reference-moe", "--memory", "64MB", "--host", "127.0.0.1", "--port", str(router),
                             "--node-port", str(node[0]), "--join-port", str(join), "--no-mdns", "--name", "macA"])
    macs = [a]
    url = f"http://127.0.0.1:{router}"
    try:
        a.wait_for("ready:")
        bad = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "up", "--join", "mlxmoe-nope"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "MLXMOE_HOME": str(tmp_path / "X")})
        assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "X" / "cluster.key").exists()
        for name, mem, port in (("macB", "7MB", node[1]), ("macC", "6MB", node[2])):
            m = Mac(tmp_path / name[-1], ["--join", token(tmp_path / "A", join), "--memory", mem, "--name", name,
                                          "--host", "127.0.0.1", "--node-port", str(port), "--no-mdns"])
            macs.append(m)
            m.wait_for("ready: group")
        deadline = time.time() + 60
        while sum(p["state"] == "up" for p in status(url)["peers"]) < 3:
            assert time.time() < deadline, status(url)["peers"]
            time.sleep(0.5)
        layout = Manifest.load(tmp_path / "A" / "bundles" / "reference-moe" / "layout")
        held = [sum(len(layout.eligible(g, l)) for l in layout.moe_layers) for g in range(3)]
        assert held[0] == layout.n_experts * len(layout.moe_layers) > held[1] > held[2] > 0
        assert not (tmp_path / "B" / "ca.key").exists() and (tmp_path / "B" / "cert.pem").exists()
        body = json.dumps({"model": "reference-moe", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "Tell me a joke."}]}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.load(r)["choices"][0]["message"]["content"]
        # a member restarts: the same part, nothing fetched again
        macs[1].stop()
        b_args = ["--host", "127.0.0.1", "--node-port", str(node[1]), "--no-mdns"]
        again = Mac(tmp_path / "B", ["--memory", "12MB", *b_args], log="B-again.log")  # more memory: same part
        macs.append(again)
        again.wait_for("ready: group 1")
        assert "0.0/" in again.output() or "done 0" in again.output() or "reused" in again.output() \
            or "in 0.0s" in again.output()
        held_b = int(again.output().split("ready: group 1, ")[1].split()[0])
        # the first Mac killed outright: its node (a child process) stops too, freeing its port
        a.proc.kill()
        deadline = time.time() + 30
        while not port_free(node[0]):
            assert time.time() < deadline, "the killed up's node still holds its port"
            time.sleep(0.5)
        # a re-plan on the first Mac: B's 12MB now count, so B gets a new, larger part when it restarts
        a2 = Mac(tmp_path / "A", ["--replan", "--yes", "--host", "127.0.0.1", "--port", str(router), "--node-port",
                                  str(node[0]), "--join-port", str(join), "--no-mdns"], log="A-replan.log")
        macs.append(a2)
        a2.wait_for("ready:")
        assert "the new plan:" in a2.output() and "macB: " in a2.output() and "a new part" in a2.output()
        again.stop()
        macs[2].stop()  # C's set changes too: it adds what A and the larger B lack
        b3 = Mac(tmp_path / "B", ["--memory", "12MB", *b_args], log="B-replanned.log")
        c3 = Mac(tmp_path / "C", ["--memory", "6MB", "--host", "127.0.0.1", "--node-port", str(node[2]), "--no-mdns"],
                 log="C-replanned.log")
        macs += [b3, c3]
        b3.wait_for("ready: group 1")
        c3.wait_for("ready: group 2")
        assert int(b3.output().split("ready: group 1, ")[1].split()[0]) > held_b
        deadline = time.time() + 60
        while sum(p["state"] == "up" for p in status(url)["peers"]) < 3:
            assert time.time() < deadline, status(url)["peers"]
            time.sleep(0.5)
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.load(r)["choices"][0]["message"]["content"]
    finally:
        for m in reversed(macs):
            m.stop()
