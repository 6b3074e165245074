"""Three unequal nodes of one layout (calibrate --budgets 1x,1.3x,2x on a tiny model; the last holds
every expert) behind one router on loopback: a chat goes to the node that serves it best, "speed"
takes the least loaded, the node holding every expert answers as the full model, and /status says
each node's expected quality. The nodes get only their own files (`copy`)."""

from __future__ import annotations

import json
import threading

import openai
import pytest

import tiny
from mlxmoe.bundle.copy import copy_bundle
from mlxmoe.bundle.manifest import Manifest
from mlxmoe.node.contract import GenParams
from mlxmoe.node.engine import Node
from test_api_sampling import RealCluster

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout-cluster")
    bundle, report = tiny.make_layout(d)
    return bundle, report


def test_each_node_gets_only_its_part_and_the_full_node_is_the_full_model(layout, tmp_path):
    bundle, _ = layout
    m = Manifest.load(bundle)
    copy_bundle(bundle, tmp_path / "n2", [2])
    node = Node.load(str(tmp_path / "n2"), 2, kv_bits=None)
    full = Node.load(str(bundle), None, kv_bits=None)
    prompt = node.encode("the quick brown fox")
    got = [e.token for e in node.generate(None, prompt, GenParams(max_tokens=8))]
    assert got == [e.token for e in full.generate(None, prompt, GenParams(max_tokens=8))]
    have = {p.name for p in (tmp_path / "n2").iterdir()}
    assert "experts-group-00.safetensors" not in have and m.files.keys() >= have - {"distribution.json"}


def test_three_unequal_nodes_behind_one_router(layout):
    bundle, report = layout
    with RealCluster(bundle) as c:
        cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(text, **kw):
            r = cl.chat.completions.with_raw_response.create(model=c.router.model, max_tokens=4, temperature=0,
                                                             messages=[{"role": "user", "content": text}], **kw)
            return r.headers["x-mlxmoe-group"]
        assert {ask(t) for t in ("def add(a, b):", "the dog sleeps", '{"id": 1}')} == {"2"}  # it serves all best
        # with the best node busy, a chat that prefers speed goes to a free one; quality still waits its turn there
        best = c.router.peers.by_url(c.node_url(2))
        best.inflight += 5
        try:
            assert ask("the fox runs", extra_body={"mlxmoe": {"prefer": "speed"}}) in {"0", "1"}
            assert ask("the fox runs again") == "2"
        finally:
            best.inflight -= 5
        peers = {p["name"]: p for p in c.router.status()["peers"]}
        held = [n["held_out"]["mean"]["ppl_ratio"] for n in report["nodes"]]
        got = [peers[c.peer_name(g)].get("expected_quality", {}).get("ppl_ratio") for g in range(3)]
        assert got == pytest.approx(held)
