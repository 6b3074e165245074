"""Network-namespace harness: a few "hosts" on one Ethernet segment, so nodes
and a router discover each other over real mDNS multicast as on a LAN.

Layout (all ours, nothing in the root namespace is touched):
    <prefix>-hub   : a Linux bridge br0 and one veth end per host
    <prefix>-h<i>  : eth0 (the other veth end) with 10.231.0.<i+1>/24, and lo

    with NetnsLab(4) as lab:
        p = lab.spawn(0, ["python", "x.py"], "x.log")
    # processes killed, namespaces deleted (even on errors)

Run as a script, `netns.py client ...` is the chat client that the netns test
runs inside the router's namespace (see tests/test_cluster_netns.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.231.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def available() -> tuple[bool, str]:
    """(True, "") if this process can create network namespaces."""
    if os.name != "posix" or os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return False, "needs iproute2's `ip`"
    probe = f"mlxt{os.getpid()}-probe"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return False, f"`ip netns add` failed: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode != 0:
            return False, f"cannot create a bridge in a namespace: {r.stderr.strip()}"
        return True, ""
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"`ip netns` unavailable: {e}"
    finally:
        _ip("netns", "del", probe, check=False)


class NetnsLab:
    def __init__(self, n_hosts: int, logdir: str | Path, prefix: str | None = None):
        self.prefix = prefix or f"mlxt{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(n_hosts)]
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(n_hosts)]
        self.logdir = Path(logdir)
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    def __enter__(self) -> "NetnsLab":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self._made.append(ns)
            # both veth ends are created inside our namespaces: hub side "v<i>", host side "eth0"
            _ip("-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
        # mDNS needs a route for 224.0.0.251 out of eth0; the /24 route alone may not cover it
        for ns in self.hosts:
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0", check=False)

    def spawn(self, i: int, argv: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.logdir / log_name, "wb")
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[i], *argv], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def run(self, i: int, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts[i], *argv], capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        p = self.logdir / name
        return p.read_text(errors="replace") if p.exists() else ""

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the python under `ip netns exec`
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()


# ---------------------------------------------------------------- client (runs inside the router's namespace)

API_KEY = "netns-api-key"  # `mlxmoe serve` on a namespace address needs one (a keyless router ignores it)


def _status(url: str) -> dict:
    import urllib.request
    req = urllib.request.Request(url + "/status", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _wait(pred, timeout: float, what: str, url: str):
    deadline = time.time() + timeout
    st = None
    while time.time() < deadline:
        try:
            st = _status(url)
            if pred(st):
                return st, time.time() - (deadline - timeout)
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(json.dumps({"error": f"timed out waiting for {what}", "status": st}))


def _txt_sessions(interface: str, timeout: float) -> dict:
    """Bonjour TXT `sessions` per node name, read directly with zeroconf."""
    from zeroconf import IPVersion, ServiceBrowser, Zeroconf

    from mlxmoe.cluster.discovery import SERVICE_TYPE
    zc = Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)
    names: set[str] = set()
    try:
        ServiceBrowser(zc, SERVICE_TYPE, handlers=[lambda zeroconf, service_type, name, state_change: names.add(name)])
        time.sleep(timeout)
        out = {}
        for n in list(names):
            info = zc.get_service_info(SERVICE_TYPE, n, timeout=2000)
            if info is not None:
                out[n.removesuffix("." + SERVICE_TYPE)] = int((info.properties.get(b"sessions") or b"0").decode())
        return out
    finally:
        zc.close()


def client_main(argv: list[str]) -> None:
    import argparse

    import openai

    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--interface", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--pids", required=True, help='JSON {"group": pid}')
    ap.add_argument("--max-tokens", type=int, default=60)
    ap.add_argument("--prompt", default="tell me a story about topic1")
    a = ap.parse_args(argv)
    pids = {int(g): pid for g, pid in json.loads(a.pids).items()}
    out: dict = {}

    st, t = _wait(lambda s: sum(p["state"] == "up" for p in s["peers"]) >= a.nodes, 90, "nodes up", a.url)
    out["discovered_s"] = t
    out["peers_before"] = st["peers"]

    cl = openai.OpenAI(base_url=a.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30.0)
    msgs = [{"role": "user", "content": a.prompt}]
    text, chunks, finish, usage = "", 0, None, None  # chunks: one per token (a token's text may be empty)
    with cl.chat.completions.with_streaming_response.create(
            model=st["model"], messages=msgs, max_tokens=a.max_tokens, stream=True,
            stream_options={"include_usage": True}) as resp:
        first_group = int(resp.headers["x-mlxmoe-group"])
        out["first_node"] = resp.headers["x-mlxmoe-node"]
        out["first_group"] = first_group
        out["prompt_tokens_header_session"] = resp.headers["x-mlxmoe-session"]
        for ch in resp.parse():
            if ch.usage:
                usage = ch.usage.model_dump()
            for c in ch.choices:
                if c.delta.role is None and c.finish_reason is None:
                    text += c.delta.content or ""
                    chunks += 1
                    if chunks == 3:
                        os.kill(pids[first_group], signal.SIGKILL)  # the serving Mac dies mid-stream
                finish = c.finish_reason or finish
    out.update(text=text, chunks=chunks, finish=finish, usage=usage)
    st = _status(a.url)
    out["sessions"], out["counters"], out["last_placement"] = st["sessions"], st["counters"], st["last_placement"]
    dead = out["first_node"]
    st, t = _wait(lambda s: any(p["name"] == dead and p["state"] == "down" for p in s["peers"]), 15,
                  "killed node marked down", a.url)
    out["killed_down_s"] = t
    out["txt_sessions"] = _txt_sessions(a.interface, 2.0)
    # a node that leaves politely (SIGTERM -> Bonjour goodbye) is removed quickly
    other = next(g for g in pids if g != first_group and g != st["sessions"][0]["group"])
    os.kill(pids[other], signal.SIGTERM)
    st, t = _wait(lambda s: any(p["groups"] == [other] and p["state"] == "down" for p in s["peers"]), 15,
                  "left node marked down", a.url)
    out["left_down_s"] = t
    out["peers_after"] = st["peers"]
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
