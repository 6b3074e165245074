"""`mlxmoe up` on three hosts, each in its own network namespace on one bridged segment (tests/netns.py),
with Bonjour on: from nothing to a chat with one command per host. Host 1 runs `mlxmoe up reference-moe
--memory 64MB` (the cluster, its router, its node), `mlxmoe token` there gives a token per joiner, hosts
2 and 3 run `mlxmoe up --join TOKEN` with 7MB and 6MB; each gets a part sized to its memory over the LAN.
A chat then goes through the router, from its namespace, with three nodes up holding different numbers
of experts. Every process (the first host's node is a child of its `up`, in a session of its own) and
every namespace is gone afterwards, even on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns
from mlxmoe.bundle.manifest import Manifest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(170)]
CLI = [sys.executable, "-m", "mlxmoe.cli"]
ROUTER_PORT = 8000

# runs inside host 1's namespace: waits for three nodes up in the router's /status and a Bonjour record of
# each (the router's own node, given by URL, is one peer with its record)
# (in any state: a record may carry the manifest its node served before it adopted), then one chat
API_KEY = "up-netns-key"  # a router on a LAN address must have one (mlxmoe up refuses to start without)
CLIENT = r"""
import json, sys, time, urllib.request
url, want, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
AUTH = {"Authorization": "Bearer " + key}
def ready(st):
    up = {p["url"] for p in st["peers"] if p["state"] == "up"}
    return len(up) >= want and up <= {p["url"] for p in st["peers"] if p["bonjour"]} and len(st["peers"]) == want
def status():
    with urllib.request.urlopen(urllib.request.Request(url + "/status", headers=AUTH), timeout=5) as r:
        return json.load(r)
deadline, st = time.time() + 60, None
while time.time() < deadline:
    try:
        st = status()
        if ready(st):
            break
    except OSError:
        pass
    time.sleep(0.3)
else:
    raise SystemExit("timed out waiting for %d nodes up and found over Bonjour: %s" % (want, json.dumps(st)))
body = json.dumps({"model": st["model"], "max_tokens": 8,
                   "messages": [{"role": "user", "content": "Tell me a joke."}]}).encode()
req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json", **AUTH})
with urllib.request.urlopen(req, timeout=60) as r:
    chat = json.load(r)
print(json.dumps({"status": st, "chat": chat, "after": status()}))
"""


@pytest.fixture(scope="module")
def netns_ok():
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"netns test skipped: {why}")


def _env(home: Path) -> dict:
    return {"MLXMOE_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _wait_for(lab, p: subprocess.Popen, log: str, text: str, deadline: float) -> None:
    while text not in lab.log(log):
        assert p.poll() is None, f"{log} exited ({p.returncode}):\n{lab.log(log)[-3000:]}"
        assert time.time() < deadline, f"no {text!r} in {log} in time:\n{lab.log(log)[-3000:]}"
        time.sleep(0.3)


def _dump(lab, homes) -> str:
    logs = sorted(lab.logdir.glob("*.log")) + [h / "logs" / "node.log" for h in homes
                                               if (h / "logs" / "node.log").exists()]
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


def _stop(lab, ups: list[subprocess.Popen]) -> None:
    """SIGTERM each `up` (the first host's takes its node down with it), then SIGKILL whatever is left
    in our namespaces (`ip netns pids`: a child in a session of its own survives its parent's kill)."""
    for p in reversed(ups):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 15
    for p in ups:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for ns in lab.hosts:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_three_hosts_up_over_mdns(netns_ok, tmp_path):
    start = time.time()
    deadline = start + 150
    homes = [tmp_path / f"home{i + 1}" for i in range(3)]
    ups: list[subprocess.Popen] = []
    with netns.NetnsLab(3, tmp_path / "logs") as lab:
        try:
            ip = lab.ips
            # Bonjour on, no --interface: zeroconf binds every interface of a namespace (lo, eth0),
            # so each node's record crosses the bridge to the router in host 1
            ups.append(lab.spawn(0, [*CLI, "up", "reference-moe", "--memory", "64MB", "--host", ip[0],
                                     "--router-host", ip[0], "--api-key", API_KEY, "--name", "mac1"],
                                 "up1.log", env=_env(homes[0])))
            _wait_for(lab, ups[0], "up1.log", "ready:", deadline)
            for i, mem in ((1, "7MB"), (2, "6MB")):
                tok = lab.run(0, [*CLI, "token", "--host", ip[0], "--home", str(homes[0])], timeout=60)
                assert tok.returncode == 0, tok.stdout + tok.stderr
                token = next(w for w in tok.stdout.split() if w.startswith("mlxmoe-"))
                ups.append(lab.spawn(i, [*CLI, "up", "--join", token, "--memory", mem, "--host", ip[i],
                                         "--name", f"mac{i + 1}"],
                                     f"up{i + 1}.log", env=_env(homes[i])))
                _wait_for(lab, ups[i], f"up{i + 1}.log", "ready: group", deadline)
            r = lab.run(0, [sys.executable, "-c", CLIENT, f"http://{ip[0]}:{ROUTER_PORT}", "3", API_KEY],
                        timeout=max(5.0, deadline - time.time()))
            assert r.returncode == 0, f"client failed:\n{r.stdout}\n{r.stderr}\n{_dump(lab, homes)}"
            out = json.loads(r.stdout.strip().splitlines()[-1])
            logs = _dump(lab, homes)
        finally:
            _stop(lab, ups)
    # nothing of ours is left behind: no namespace, no process
    assert not [ns for ns in os.popen("ip netns list").read().split() if ns.startswith(lab.prefix)]
    assert all(p.poll() is not None for p in ups)

    # each host has its own config home: the joiners got a certificate, never the CA's key
    for h in homes[1:]:
        assert (h / "cert.pem").exists() and (h / "cluster.key").exists() and not (h / "ca.key").exists()
    # three nodes up, one per group, holding different numbers of experts (64MB: all of them)
    layout = Manifest.load(homes[0] / "bundles" / "reference-moe" / "layout")
    held = [sum(len(layout.eligible(g, l)) for l in layout.moe_layers) for g in range(layout.n_groups)]
    assert layout.n_groups == 3 and held[0] == layout.n_experts * len(layout.moe_layers) > held[1] > held[2] > 0
    up = [p for p in out["status"]["peers"] if p["state"] == "up"]
    by_url = {p["url"]: p["groups"] for p in up}
    assert sorted(by_url) == sorted(f"https://{a}:7420" for a in ip), up
    assert sorted(g for gs in by_url.values() for g in gs) == [0, 1, 2], up
    mdns = {p["url"] for p in out["status"]["peers"] if p["bonjour"]}  # Bonjour across the namespaces
    assert set(by_url) <= mdns and len(out["status"]["peers"]) == 3, out["status"]["peers"]
    assert out["status"]["manifest_hash"] == layout.hash
    # the chat was answered by one of them
    assert out["chat"]["choices"][0]["message"]["content"], out["chat"]
    assert out["after"]["counters"]["requests"] >= 1
    elapsed = time.time() - start
    print(json.dumps({"elapsed_s": round(elapsed, 1), "held": held,
                      "peers": [(p["name"], p["source"], p["url"], p["groups"], p["state"])
                                for p in out["status"]["peers"]]}))
    assert elapsed < 170, logs
