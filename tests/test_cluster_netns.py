"""Multi-host test: three nodes and a router, each in its own network
namespace on one bridged segment, finding each other over real mDNS; a chat
through the openai client from the router's namespace; the serving node is
SIGKILLed mid-stream and the stream completes on another node."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import netns
from fakes import encode_chat, expected_text

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]
HERE = Path(__file__).parent
PORT_NODE, PORT_ROUTER = 7420, 8000


@pytest.fixture(scope="module")
def netns_ok():
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"netns test skipped: {why}")


def _dump_logs(lab) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(lab.logdir.glob("*.log")))


def test_three_nodes_router_mdns_failover(netns_ok, tmp_path):
    from mlxmoe.cluster.keys import create_key
    key = str(create_key(tmp_path / "cluster.key"))
    py, fakes = sys.executable, str(HERE / "fakes.py")
    max_tokens = 60
    with netns.NetnsLab(4, tmp_path / "logs") as lab:
        rip = lab.ips[0]
        pids = {}
        for g in range(3):
            ip = lab.ips[g + 1]
            p = lab.spawn(g + 1, [py, fakes, "node", "--group", str(g), "--host", ip, "--port", str(PORT_NODE),
                                  "--key", key, "--interface", ip, "--delay", "0.04"], f"node{g}.log")
            pids[g] = p.pid
        lab.spawn(0, [py, fakes, "router", "--host", rip, "--port", str(PORT_ROUTER), "--key", key,
                      "--interface", rip], "router.log")
        r = lab.run(0, [py, str(HERE / "netns.py"), "client", "--url", f"http://{rip}:{PORT_ROUTER}",
                        "--interface", rip, "--nodes", "3", "--pids", json.dumps(pids),
                        "--max-tokens", str(max_tokens), "--prompt", "tell me a story about topic1"], timeout=100)
        assert r.returncode == 0, f"client failed:\n{r.stdout}\n{r.stderr}\n{_dump_logs(lab)}"
        out = json.loads(r.stdout.strip().splitlines()[-1])
        logs = _dump_logs(lab)

    print(json.dumps({k: out[k] for k in ("discovered_s", "killed_down_s", "left_down_s", "txt_sessions",
                                          "counters")}))
    print(json.dumps([(p["name"], p["state"], p["reason"]) for p in out["peers_after"]]))
    # discovered over mDNS, verified by an authenticated info probe
    assert all(p["source"] == "mdns" and p["state"] == "up" for p in out["peers_before"]), out["peers_before"]
    assert sorted(g for p in out["peers_before"] for g in p["groups"]) == [0, 1, 2]
    assert out["discovered_s"] < 20
    # placed on the best group, then the node was killed mid-stream ...
    assert out["first_group"] == 1
    msgs = [{"role": "user", "content": "tell me a story about topic1"}]
    # ... and the stream finished on another node with nothing lost or repeated
    assert out["text"] == expected_text(encode_chat(msgs), max_tokens), logs
    assert out["usage"]["completion_tokens"] == max_tokens and out["finish"] == "length"
    assert out["counters"]["failovers"] == 1
    (sess,) = out["sessions"]
    assert sess["node"] != out["first_node"] and sess["group"] != 1
    assert out["killed_down_s"] < 10
    # Bonjour TXT follows the node's sessions (the node that finished the chat has one)
    assert any(n == sess["node"] and v >= 1 for n, v in out["txt_sessions"].items()), out["txt_sessions"]
    assert out["left_down_s"] < 10
    # nothing of ours is left behind
    assert not [ns for ns in os.popen("ip netns list").read().split() if ns.startswith(lab.prefix)]
