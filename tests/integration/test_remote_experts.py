"""Remote routed experts (issue 8, node side): the `experts` RPC op returns
exactly what the node's own masked block computes; a node in routing="group"
decodes exactly like the node that holds that group; one-hop routing equals
the full model with the per-token dynamic mask; malformed requests get a
WireError naming the field; a peer lost mid-step leaves the cache consistent.

Nodes are real node servers (aiohttp, loopback) of the committed reference
model split in 3 groups. Exactness: the reference model computes in bf16 and
bf16 travels as its raw bits, so a remote call is bit-exact against the same
computation done locally (tests a, b). The one-hop oracle is a different
program (the full model, softmax over 48 masked logits instead of a node's
16 local rows), which in bf16 rounds differently and drifts within a few
tokens; in float32 the two agree to 1e-5, so test c loads the nodes in float32
(f32 also travels exactly) and compares greedy tokens."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import mlx.core as mx
import numpy as np
import pytest

from fakes import LoopThread
from mlxmoe import wire
from mlxmoe.cluster.client import NodeClient
from mlxmoe.errors import RpcError
from mlxmoe.cluster.node_server import start_node
from mlxmoe.errors import MlxMoeError
from mlxmoe.node.contract import GenParams
from mlxmoe.model.load import load_bundle
from mlxmoe.node.engine import Node
from mlxmoe.errors import PeerError
from mlxmoe.node.remote.choose import dynamic_onehop
from mlxmoe.node.remote.peers import PeerLink
from mlxmoe.bundle.split import split

pytestmark = pytest.mark.timeout(120)
REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"
KEY = b"r" * 32
PROMPT = list(range(100, 140))
N_TOKENS = 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "b3"
    split(str(REFERENCE), out, 3)
    return out


def node_factory(bundle, group, f32=False):
    def make():
        if not f32:
            return Node.load(str(bundle), group)
        return Node(load_bundle(bundle, group, dtype=mx.float32), None, kv_bits=8, bundle_dir=str(bundle))
    return make


class Servers(LoopThread):
    """Node servers on loopback (their engines on their own threads), so the
    test thread can run its own MLX oracle."""

    def __init__(self, bundle, groups, f32=False):
        super().__init__()
        self.bundle, self.groups, self.f32 = bundle, groups, f32
        self.nodes = []

    def run(self, coro, timeout=60.0):
        return super().run(coro, timeout)

    async def _start(self):
        for g in self.groups:
            self.nodes.append(await start_node(None, KEY, "127.0.0.1", 0, advertise=False,
                                               factory=node_factory(self.bundle, g, self.f32)))
        self.http = aiohttp.ClientSession()
        self.mh = self.nodes[0].server.identity["manifest_hash"]
        self.clients = [NodeClient(self.http, n.url, KEY, self.mh) for n in self.nodes]

    async def _stop(self):
        await self.http.close()
        for n in self.nodes:
            await n.stop()

    def url(self, g):
        return self.nodes[self.groups.index(g)].url

    def client(self, g):
        return self.clients[self.groups.index(g)]

    def generate(self, g, session, prompt=PROMPT, **params):
        async def go():
            frames = [f async for f in self.client(g).generate(session, prompt, {"max_tokens": N_TOKENS, **params})]
            return [f["token"] for f in frames if f["t"] == "tok"]
        return self.run(go())

    def call(self, g, op, body=None):
        return self.run(self.client(g).call(op, body or {}))

    def experts(self, g, layer, x):
        """The `experts` op through the node-to-node client, as a peer calls it."""
        link = PeerLink(self.url(g), KEY, self.mh)
        try:
            return link.call("experts", {"layer": layer, "x": wire.encode_tensor(x)})[0]["y"]
        finally:
            link.close()


@pytest.fixture(scope="module")
def bf16(bundle):
    with Servers(bundle, [0, 1]) as s:
        yield s


# ---------------------------------------------------------------- (a) the op is the local computation

@pytest.mark.parametrize("shape", [(5, 256), (1, 1, 256), (1, 37, 256)])
def test_experts_op_returns_exactly_the_groups_own_block(bundle, bf16, shape):
    node1 = Node.load(str(bundle), 1)  # the same group, computed here
    m = node1.manifest
    x = (mx.random.normal(shape, key=mx.random.key(sum(shape))) * 0.5).astype(mx.bfloat16)
    for layer in (m.moe_layers[0], m.moe_layers[-1]):
        y = bf16.experts(1, layer, x)
        assert y["dtype"] == "bf16" and y["shape"] == list(shape)
        # the block's own forward (qwen3_moe has no shared experts: all of it is the routed part)
        want = node1.loaded.blocks[layer](x.reshape(1, -1, 256)).reshape(shape)
        assert np.array_equal(np.array(wire.decode_tensor(y).view(mx.uint16)), np.array(want.view(mx.uint16)))
        other = bf16.experts(0, layer, x)
        assert not np.array_equal(np.array(wire.decode_tensor(other).view(mx.uint16)),
                                  np.array(want.view(mx.uint16)))  # each node routes to its own group


# ---------------------------------------------------------------- (b) soft migration: group mode

def test_group_mode_decodes_exactly_like_the_node_holding_that_group(bf16):
    local = bf16.generate(1, "pinned-1")
    remote = bf16.generate(0, "soft-0", routing="group", expert_group=1, peers={"1": bf16.url(1)})
    assert remote == local and len(local) == N_TOKENS
    own = bf16.generate(0, "own-0", routing="group", expert_group=0, peers={})  # its own group: plain local
    assert own == bf16.generate(0, "plain-0")
    st = bf16.call(0, "info")["session_stats"]
    steps = 2 + N_TOKENS  # prefill chunk, last prompt token, then one step per token generated
    moe_layers = len(bf16.call(0, "info")["experts_op"]["layers"])
    assert st["soft-0"]["routing"] == "group" and st["soft-0"]["expert_group"] == 1
    assert st["soft-0"]["remote_calls"] == steps * moe_layers and st["soft-0"]["remote_bytes"] > 0
    assert st["own-0"]["remote_calls"] == 0 and st["plain-0"]["routing"] == "local"
    # the next turn reuses the session's cache (soft-migrated KV stays put) and still matches
    more = PROMPT + local + [7, 8, 9]
    assert bf16.generate(0, "soft-0", more, routing="group", expert_group=1, peers={"1": bf16.url(1)}) == \
        bf16.generate(1, "pinned-1", more)


def test_unreachable_peer_fails_before_the_first_token_naming_it(bf16):
    with pytest.raises(RpcError) as ei:
        bf16.generate(0, "lost", routing="group", expert_group=1, peers={"1": "http://127.0.0.1:9"})
    e = ei.value
    assert e.status == 502 and e.code == "peer_failed" and e.retryable and "group 1 at http://127.0.0.1:9" in e.message
    with pytest.raises(RpcError) as ei:  # a mode that needs a peer it was not given
        bf16.generate(0, "nopeer", routing="group", expert_group=1, peers={})
    assert ei.value.status == 400 and "group 1" in ei.value.message


# ---------------------------------------------------------------- (c) one-hop routing vs its oracle

def test_onehop_equals_full_model_with_the_dynamic_mask(bundle):
    full = Node(load_bundle(bundle, None, dtype=mx.float32), None, kv_bits=8)
    picks = []
    with dynamic_onehop(full.loaded, home=0, on_pick=lambda l, p: picks.append(np.array(p).reshape(-1))):
        want = [e.token for e in full.generate("oracle", PROMPT, GenParams(max_tokens=N_TOKENS))]
    picks = np.concatenate(picks)
    assert (picks == 0).any() and (picks != 0).any()  # the case mixes local and remote layer steps
    with Servers(bundle, [0, 1, 2], f32=True) as s:
        got = s.generate(0, "hop", routing="onehop", peers={"1": s.url(1), "2": s.url(2)})
        st = s.call(0, "info")["session_stats"]["hop"]
    assert got == want
    assert st["routing"] == "onehop" and st["remote_calls"] > 0 and st["local_steps"] > 0
    assert st["remote_bytes"] > st["remote_calls"] * 2 * 256 * 4  # f32 hidden states, both ways


def test_split_equals_full_model_with_the_union_mask(bundle):
    """split: top-k over home ∪ one other group's set, the chosen experts run
    where they are held: equals the full model masked per token to that union."""
    full = Node(load_bundle(bundle, None, dtype=mx.float32), None, kv_bits=8)
    with dynamic_onehop(full.loaded, home=0, split=True):
        want = [e.token for e in full.generate("oracle", PROMPT, GenParams(max_tokens=N_TOKENS))]
    with Servers(bundle, [0, 1, 2], f32=True) as s:
        got = s.generate(0, "split", routing="split", peers={"1": s.url(1), "2": s.url(2)})
        st = s.call(0, "info")["session_stats"]["split"]
        x = wire.encode_tensor(mx.zeros((2, 256), mx.float32))
        held = set(Node.load(str(bundle), 1).loaded.local_ids[0])
        away = next(e for e in range(48) if e not in held)
        with pytest.raises(RpcError) as ei:
            s.call(1, "experts", {"layer": 0, "x": x, "ids": [away, away]})
        assert ei.value.status == 400 and f"[{away}] of layer 0 are not on this node" in ei.value.message
    assert got == want
    assert st["routing"] == "split" and st["remote_calls"] > 0 and st["local_steps"] > 0


# ---------------------------------------------------------------- (d) malformed `experts` requests

def _bad(bf16, body):
    with pytest.raises(RpcError) as ei:
        bf16.call(1, "experts", body)
    assert ei.value.status == 400, ei.value
    return ei.value.message


def test_malformed_experts_requests_name_the_field(bf16):
    x = wire.encode_tensor(mx.zeros((2, 256), mx.bfloat16))
    assert "'body.layer'" in _bad(bf16, {"layer": 99, "x": x})
    assert "'body.layer'" in _bad(bf16, {"layer": "0", "x": x})
    assert "'body.x.shape'" in _bad(bf16, {"layer": 0, "x": wire.encode_tensor(mx.zeros((4, 128), mx.bfloat16))})
    assert "'body.x.shape'" in _bad(bf16, {"layer": 0, "x": {**x, "shape": [512]}})
    assert "'body.x.shape'" in _bad(bf16, {"layer": 0, "x": {**x, "shape": [2, 1, 256]}})
    assert "'body.x.dtype'" in _bad(bf16, {"layer": 0, "x": {**x, "dtype": "f64"}})
    assert "'body.x.data'" in _bad(bf16, {"layer": 0, "x": {**x, "data": x["data"][:-2]}})
    assert "'body.x.data'" in _bad(bf16, {"layer": 0, "x": {**x, "data": "text"}})
    assert "'body.x'" in _bad(bf16, {"layer": 0})
    assert "'body.x.extra'" in _bad(bf16, {"layer": 0, "x": {**x, "extra": 1}})
    assert "'body.ids'" in _bad(bf16, {"layer": 0, "x": x, "ids": [1]})  # one id for two rows
    assert "'body.ids'" in _bad(bf16, {"layer": 0, "x": x, "ids": ["a", "b"]})
    assert "'body.rows'" in _bad(bf16, {"layer": 0, "x": x, "ids": [1, 2, 3], "rows": [0, 2, 1]})  # row 2 of 2
    assert "'body.rows'" in _bad(bf16, {"layer": 0, "x": x, "ids": [1, 2], "rows": [0]})
    assert "'body.rows'" in _bad(bf16, {"layer": 0, "x": x, "rows": [0, 1]})


def test_malformed_routing_params_name_the_field(bf16):
    def bad(**p):
        with pytest.raises(RpcError) as ei:
            bf16.generate(0, "badp", **p)
        assert ei.value.status == 400
        return ei.value.message
    assert "'body.params.routing'" in bad(routing="teleport")
    assert "'body.params.expert_group'" in bad(routing="group")
    assert "'body.params.peers'" in bad(routing="onehop", peers={"one": "http://x"})
    assert "'body.params.peers.1'" in bad(routing="onehop", peers={"1": "ftp://x"})
    assert "expert_group: 7" in bad(routing="group", expert_group=7, peers={})


# ---------------------------------------------------------------- a peer lost mid-step

class FlakyLink:
    """In-process stand-in for a PeerLink: calls another Node; fails after `ok` calls."""

    def __init__(self, node, ok=None):
        self.node, self.ok, self.calls, self.name = node, ok, 0, f"group {node.group} (in-process)"

    def call(self, op, body):
        self.calls += 1
        if self.ok is not None and self.calls > self.ok:
            raise PeerError(f"peer {self.name}: gone", self.name)
        return {"y": self.node.experts(body["layer"], body["x"], body.get("ids"), body.get("rows"))}, 0


def test_peer_lost_midway_leaves_the_cache_consistent_and_the_session_continues(bundle):
    n0, n1 = Node.load(str(bundle), 0), Node.load(str(bundle), 1)
    n0.attach_cluster(KEY)
    params = GenParams(max_tokens=N_TOKENS, routing="group", expert_group=1, peers={"1": "http://in-process"})
    n0.remote.link = lambda url, group: FlakyLink(n1)
    whole = [e.token for e in n0.generate("whole", PROMPT, params)]
    # the peer dies at layer 3 of the 9th step: layers 0..3 of that step already wrote their KV
    n0.remote.link = lambda url, group: FlakyLink(n1, ok=8 * 6 + 3)
    got = []
    with pytest.raises(PeerError, match="group 1"):
        for e in n0.generate("cut", PROMPT, params):
            got.append(e.token)
    s = n0.sessions.sessions["cut"]
    assert 0 < len(got) < N_TOKENS and got == whole[:len(got)]
    assert s.tokens == PROMPT + got and all(c.offset == len(s.tokens) for c in s.cache) and not s.busy
    # the router retries with the transcript so far: the session continues exactly as if never cut
    n0.remote.link = lambda url, group: FlakyLink(n1)
    rest = [e.token for e in n0.generate("cut", PROMPT + got, GenParams(**{**params.to_dict(), "max_tokens": N_TOKENS - len(got)}))]
    assert got + rest == whole


# ---------------------------------------------------------------- quality of one-hop (eval machinery)

def test_onehop_quality_eval(ckpt, tmp_path):
    import json

    from click.testing import CliRunner

    from mlxmoe.quality import eval as q
    from mlxmoe.cli import main

    texts = ["def add(a, b):\n    return a + b\n" * 4, "the quick brown fox jumps over the lazy dog " * 4,
             "for i in range(10):\n    print(i, i * i)\n" * 3, "mixture of experts route tokens to experts " * 4]
    suite = tmp_path / "s.jsonl"
    suite.write_text("".join(json.dumps({"domain": "code" if "(" in t else "prose", "text": t}) + "\n" for t in texts))
    src = ckpt("qwen3_moe")
    one = split(str(src), tmp_path / "one", 1, bits=None, trunk_bits=None)  # every expert local: one-hop = full model
    r1 = q.evaluate_onehop(tmp_path / "one", suites=[str(suite)], prompt_tokens=8)
    assert r1["mean"]["kl"] < 1e-6 and abs(r1["mean"]["ppl_ratio"] - 1) < 1e-5 and r1["mean"]["remote_share"] == 0
    split(str(src), tmp_path / "two", 2, bits=None, trunk_bits=None)
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "two"), "--suite", str(suite), "--prompt-tokens", "8",
                                    "--placement", "first", "--onehop", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    hop, pinned = rep["onehop"], rep["results"][0]
    assert set(hop["domains"]) == {"code", "prose"} and 0 < hop["mean"]["remote_share"] < 1
    assert 0 < hop["mean"]["kl"] < pinned["mean"]["kl"]  # the per-token best group beats a static pin
    sp = q.evaluate_onehop(tmp_path / "two", suites=[str(suite)], prompt_tokens=8, split=True)
    assert sp["mode"] == "split" and sp["mean"]["kl"] < 1e-6  # 2 groups: home ∪ the other = every expert
    assert 0 < sp["mean"]["remote_share"] < 1
    assert one.n_groups == 1


# ---------------------------------------------------------------- every routing rule, shared experts

@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss"])
def test_remote_layers_are_exact_for_every_routing_rule(ckpt, tmp_path, arch):
    """Shared experts (qwen2_moe, deepseek_v3) stay with the caller, sigmoid
    group-limited routing (deepseek_v3) and softmax-after-top-k (mixtral,
    gpt_oss) route on the remote node: group mode equals the other node's own
    forward exactly (float32), one-hop equals its oracle (in-process links)."""
    from mlxmoe.node.remote.route import Route, _stats

    split(str(ckpt(arch)), tmp_path / "b", 2, overlay={"all": [1]}, bits=None, trunk_bits=None)
    n0, n1, full = (Node(load_bundle(tmp_path / "b", g), None, kv_bits=None) for g in (0, 1, None))
    ids = mx.array([[3, 17, 99, 250, 7, 42, 11, 300, 5, 64]])
    for x in (ids, ids[:, :1]):  # a prompt chunk, and one token (fused.py's one-token path)
        group = Route(n0.remote, "group", 0, {1: FlakyLink(n1)}, _stats("group", 1))
        with group.active():
            assert mx.array_equal(n0.model(x), n1.model(x)).item()
    hop = Route(n0.remote, "onehop", 0, {1: FlakyLink(n1)}, _stats("onehop", None))
    with hop.active():
        got = n0.model(ids)
    with dynamic_onehop(full.loaded, 0):
        want = full.model(ids)
    assert mx.abs(got - want).max().item() < 1e-5 and hop.stats["remote_calls"] > 0
    if arch == "deepseek_v3":  # split needs a Linear router
        with pytest.raises(MlxMoeError, match="'split' needs a Linear router"):
            n0.remote.route("s", GenParams(routing="split", peers={"1": "http://x"}))
        return
    sp = Route(n0.remote, "split", 0, {1: FlakyLink(n1)}, _stats("split", None))
    for x in (ids, ids[:, :1]):
        with sp.active():
            got = n0.model(x)
        with dynamic_onehop(full.loaded, 0, split=True):
            want = full.model(x)
        assert mx.abs(got - want).max().item() < 1e-5
    assert sp.stats["remote_calls"] > 0


def test_a_large_prompt_chunk_is_split_into_calls(ckpt, tmp_path, monkeypatch):
    from mlxmoe.node.remote import route as remote
    from mlxmoe.node.remote.route import Route, _stats

    split(str(ckpt("qwen3_moe")), tmp_path / "b", 2, bits=None, trunk_bits=None)
    n0, n1 = (Node(load_bundle(tmp_path / "b", g), None, kv_bits=None) for g in (0, 1))
    ids = mx.array([[3, 17, 99, 250, 7, 42, 11, 300, 5, 64]])
    hidden = n0.manifest.model["config"]["hidden_size"]
    monkeypatch.setattr(remote, "MAX_CALL_BYTES", 3 * hidden * 4)  # 3 float32 tokens per call
    group = Route(n0.remote, "group", 0, {1: FlakyLink(n1)}, _stats("group", 1))
    with group.active():
        assert mx.array_equal(n0.model(ids), n1.model(ids)).item()
    assert group.stats["remote_calls"] == 4 * len(n0.manifest.moe_layers)  # 10 tokens: 3 + 3 + 3 + 1
    full = Node(load_bundle(tmp_path / "b", None), None, kv_bits=None)
    with dynamic_onehop(full.loaded, 0, split=True):
        want = full.model(ids)  # 2 groups: home ∪ the other = every expert
    sp = Route(n0.remote, "split", 0, {1: FlakyLink(n1)}, _stats("split", None))
    with sp.active():
        got = n0.model(ids)
    assert mx.abs(got - want).max().item() < 1e-5
    assert sp.stats["remote_calls"] > len(n0.manifest.moe_layers)  # some layers needed more than one call


def test_an_engine_without_remote_experts_says_so():
    from fakes import HASH, FakeEngine

    x = wire.encode_tensor(mx.zeros((1, 8), mx.bfloat16))

    async def go():
        node = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False)
        try:
            async with aiohttp.ClientSession() as http:
                with pytest.raises(RpcError) as ei:
                    await NodeClient(http, node.url, KEY, HASH).call("experts", {"layer": 0, "x": x})
                with pytest.raises(PeerError) as pi:  # and a peer, over its own link
                    await asyncio.to_thread(PeerLink(node.url, KEY, HASH).call, "experts", {"layer": 0, "x": x})
                assert "HTTP 501 unsupported" in str(pi.value)
                return ei.value
        finally:
            await node.stop()
    e = asyncio.run(go())
    assert e.status == 501 and e.code == "unsupported" and not e.retryable


def test_batched_routed_rows_share_one_call_per_peer_per_layer_step(bundle):
    """Two onehop sessions and a local one decode together on node 0: each
    gives what it gives alone, and the onehop rows' calls are shared (one
    call per peer per MoE layer step for both rows, not one each)."""
    with Servers(bundle, [0, 1, 2], f32=True) as s:
        peers = {"1": s.url(1), "2": s.url(2)}
        want_hop = s.generate(0, "hop-alone", routing="onehop", peers=peers)
        want_local = s.generate(0, "local-alone")
        served = lambda: s.call(1, "info")["experts_served"] + s.call(2, "info")["experts_served"]  # noqa: E731
        before = served()
        s.generate(0, "hop-alone-2", routing="onehop", peers=peers)
        alone_calls = served() - before

        async def together():
            async def one(sid, **p):
                frames = [f async for f in s.client(0).generate(sid, PROMPT, {"max_tokens": N_TOKENS, **p})]
                return [f["token"] for f in frames if f["t"] == "tok"]
            return await asyncio.gather(one("hop-a", routing="onehop", peers=peers),
                                        one("hop-b", routing="onehop", peers=peers), one("local"))
        before = served()
        a, b, local = s.run(together())
        shared_calls = served() - before
        st = s.call(0, "info")["session_stats"]
    assert a == want_hop and b == want_hop and local == want_local
    assert st["hop-a"]["remote_calls"] > 0 and st["hop-b"]["remote_calls"] > 0
    assert shared_calls < 2 * alone_calls  # batched steps sent both rows' hidden states in one call


@pytest.mark.parametrize("routing", ["split", "onehop"])
def test_nodes_calling_each_other_at_once_give_what_each_gives_alone(bundle, routing):
    """Two nodes decode at the same time, each borrowing the other's experts: while one waits on its
    peer inside a routed step (its experts module replaced by the split's stand-in), it serves the
    peer's own request with its pristine blocks. Each text is what it is alone; no 5xx."""
    with Servers(bundle, [0, 1], f32=True) as s:
        def params(g):
            return {"max_tokens": N_TOKENS, "routing": routing, "peers": {str(1 - g): s.url(1 - g)}}

        async def one(g, sid, prompt):
            frames = [f async for f in s.client(g).generate(sid, prompt, params(g))]
            return [f["token"] for f in frames if f["t"] == "tok"]

        prompts = {g: [p + 7 * g for p in PROMPT] for g in (0, 1)}

        async def together():  # first, on fresh nodes: neither has served an experts call yet
            return await asyncio.gather(*(one(g, f"both-{g}-{i}", prompts[g]) for g in (0, 1) for i in range(3)))
        t0 = time.monotonic()
        both = s.run(together())
        assert time.monotonic() - t0 < 25  # no node waited out a peer's timeout (30 s)
        alone = {g: s.run(one(g, f"alone-{g}", prompts[g])) for g in (0, 1)}
        served = [s.call(g, "info")["experts_served"] for g in (0, 1)]
    assert all(len(t) == N_TOKENS for t in both)
    assert both == [alone[g] for g in (0, 1) for _ in range(3)]
    assert all(n > 0 for n in served)
