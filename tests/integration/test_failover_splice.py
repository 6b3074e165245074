"""Exact splice on real nodes (docs/ARCHITECTURE.md): replica nodes (the
reference model split with --groups 1, so every node holds every expert;
float32; greedy) behind a real router. The serving node's server is killed
mid-stream after exactly k tokens (the engine stops there, then its
connections are dropped), and the streamed text equals the uninterrupted
answer exactly: kills right before a token that starts with a space (the
"   @property" and " \"" cases), while a stop string's prefix is held back,
and inside 4-byte characters the byte-level tokenizer splits across tokens
(a flag emoji). A hard migration mid-turn (a group split) streams exactly
the one-detokenizer text of the tokens the two nodes generated."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import mlx.core as mx
import openai
import pytest

from fakes import FakeEngine, FakeFrontend, LocalCluster
from mlxmoe.bundle.split import split

pytestmark = pytest.mark.timeout(180)
REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"
CODE = "    @property\n    def name(self):\n"  # greedy: "       return self._name\n\n    @property\n ..."
JSON = '{"alpha_2": "AX", "name": "\u00c5land'  # greedy: '", "numeric": ... "flag": "🇹🇹", ...'
# (prompt, max_tokens, stop, k = tokens delivered when the node dies, what lies at k)
CASES = [
    (CODE, 24, [], 7, "before 'Ġ@' (the '   @property' case)"),
    (CODE, 24, [], 12, "before 'Ġdef'"),
    (CODE, 24, ["@propertz"], 9, "'@pro' held back as a stop-string prefix"),
    (JSON, 40, [], 32, "inside the first flag letter (after its first 3 bytes)"),
    (JSON, 40, [], 34, "inside the second flag letter"),
    (JSON, 40, [], 30, "before 'Ġ\"'"),
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("splice")
    split(str(REFERENCE), root / "g1", 1)
    return root


class Plan:
    """Which stream dies where, shared by the nodes: the next fresh stream (not
    a continuation) stops after `k` tokens and its node is killed."""

    def __init__(self):
        self.k: int | None = None
        self.resumes: list[int] = []  # params.resume of every generate call
        self.lock = threading.Lock()

    def take(self, resume: int) -> int | None:
        with self.lock:
            self.resumes.append(resume)
            k, self.k = (self.k, None) if resume == 0 else (None, self.k)
            return k


def replica(bundle: str, plan: Plan):
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.node.engine import Node

    class Replica(Node):
        running = loop = None

        def generate(self, session_id, prompt, params):
            events = super().generate(session_id, prompt, params)  # validation errors raise here
            k = plan.take(params.resume)
            return events if k is None else self._die_at(events, k)

        def _die_at(self, events, k):
            for i, ev in enumerate(events):
                if i == k:  # token k is computed but never sent: the node dies here
                    time.sleep(0.3)  # the k frames already written reach the router first
                    asyncio.run_coroutine_threadsafe(self.running.kill(), self.loop)
                    time.sleep(1.0)
                    events.close()  # here, on the engine thread that owns its MLX stream
                    raise RuntimeError("killed")
                yield ev

    return lambda: Replica(load_bundle(bundle, 0, dtype=mx.float32), load_tokenizer(bundle), kv_bits=None,
                           bundle_dir=bundle)


class ReplicaCluster(LocalCluster):
    """Three real replica nodes + the real trunk front end, on loopback."""

    def __init__(self, bundle, n=3, **router_kw):
        super().__init__([FakeEngine() for _ in range(n)], frontend=FakeFrontend(), **router_kw)
        self.bundle, self.plan = str(bundle), Plan()

    async def _start(self):
        from mlxmoe.cluster.api import start_router
        from mlxmoe.cluster.node_server import start_node
        from mlxmoe.cluster.router import Router
        from mlxmoe.node.trunk import TrunkFrontend

        for i in range(len(self.engines)):
            node = await start_node(None, self.key, "127.0.0.1", 0, advertise=False, name=f"node{i}",
                                    factory=replica(self.bundle, self.plan))
            node.server.engine.running, node.server.engine.loop = node, asyncio.get_running_loop()
            self.nodes.append(node)
        router = Router(None, self.key, frontend_factory=lambda: TrunkFrontend.load(self.bundle, verify=False),
                        static_peers=[n.url for n in self.nodes], mdns=False, **self.router_kw)
        self.running = await start_router(router, "127.0.0.1", 0)


def complete(c, prompt, max_tokens, stop) -> tuple[str, str | None]:
    cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = cl.models.list().data[0].id
    text, finish = "", None
    for ch in cl.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stop=stop or None,
                                    temperature=0.0, stream=True):
        for choice in ch.choices:
            text += choice.text or ""
            finish = choice.finish_reason or finish
    return text, finish


def chat(c, msgs, max_tokens) -> tuple[str, str | None]:
    cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    text, finish = "", None
    for ch in cl.chat.completions.create(model=cl.models.list().data[0].id, messages=msgs, max_tokens=max_tokens,
                                         temperature=0.0, stream=True):
        for choice in ch.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("pair", [CASES[0:2], CASES[2:4], CASES[4:6]], ids=["code", "stop+flag", "flag+quote"])
def test_kill_the_serving_node_mid_stream_text_is_exact(bundles, pair):
    """Two kills per cluster (three replicas): each splice lands exactly at k."""
    with ReplicaCluster(bundles / "g1", probe_interval=60.0) as c:
        for prompt, max_tokens, stop, k, where in pair:
            whole = complete(c, prompt, max_tokens, stop)  # uninterrupted: one node, start to end
            before = len(c.plan.resumes)
            c.plan.k = k
            spliced = complete(c, prompt, max_tokens, stop)
            assert spliced == whole, where
            assert c.plan.resumes[before:] == [0, k], where  # killed after k tokens; the next node resumed at k
        assert c.router.status()["counters"]["failovers"] == 2
        assert sum(p["state"] == "down" for p in c.router.status()["peers"]) == 2


def test_the_cases_hit_what_they_name(bundles):
    """The kill points are where the case list says (the greedy answer is what
    the comments claim), so the test above covers spaces and split characters."""
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node

    b = str(bundles / "g1")
    tok = load_tokenizer(b)
    node = Node(load_bundle(b, 0, dtype=mx.float32), tok, kv_bits=None, bundle_dir=b)
    for prompt, max_tokens, stop, k, where in CASES:
        toks = [e.token for e in node.generate(None, node.encode(prompt), GenParams(max_tokens=max_tokens))]
        piece = tok.decode([toks[k]])
        if "before" in where:
            assert piece.startswith(" "), (where, piece)
        if "inside" in where:
            assert tok.decode(toks[:k]).endswith("\ufffd") and "\ufffd" in piece, (where, piece)
        if "held back" in where:
            assert tok.decode(toks[:k]).endswith("@pro") and stop == ["@propertz"]


def test_hard_migration_mid_turn_is_exact(bundles, tmp_path):
    """Group 1 wins once the answer is 8 tokens long: the session's KV moves
    to group 1's node mid-turn, and the streamed text equals one streaming
    detokenizer over the turn's tokens (the 8 from group 0's node, then those
    group 1's node generates from the moved KV), as one node would stream them."""
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.node.engine import Node
    from mlxmoe.node.stream import text_events
    from mlxmoe.cluster.node_server import SELF_CHECK
    from mlxmoe.node.trunk import TrunkFrontend

    b3 = str(tmp_path / "g3")
    split(str(REFERENCE), b3, 3)
    calls = []  # (group, params.resume, the prompt's turn tokens, tokens generated)

    class Recording(Node):
        def generate(self, session_id, prompt, params):
            out = []
            if session_id != SELF_CHECK:  # the node's start-up check is not a chat
                calls.append((self.group, params.resume, prompt[len(prompt) - params.resume:], out))
            for ev in super().generate(session_id, prompt, params):
                out.append(ev.token)
                yield ev

    class Shifting(LocalCluster):
        base = None

        async def _start(self):
            from mlxmoe.cluster.api import start_router
            from mlxmoe.cluster.node_server import start_node
            from mlxmoe.cluster.router import Router
            outer = self

            class Front(TrunkFrontend):
                def score(self, tokens):
                    sc = super().score(tokens)
                    late = outer.base is not None and len(tokens) >= outer.base + 8
                    sc.scores = {0: 0.2, 1: 0.7, 2: 0.1} if late else {0: 0.8, 1: 0.11, 2: 0.1}
                    return sc

            for g in range(3):
                make = lambda g=g: Recording(load_bundle(b3, g, dtype=mx.float32), load_tokenizer(b3), kv_bits=None)
                self.nodes.append(await start_node(None, self.key, "127.0.0.1", 0, advertise=False, name=f"n{g}",
                                                   factory=make))
            router = Router(None, self.key, frontend_factory=lambda: Front.load(b3, verify=False),
                            static_peers=[n.url for n in self.nodes], mdns=False, **self.router_kw)
            self.running = await start_router(router, "127.0.0.1", 0)

    mob = {"mode": "hard", "checks": 1, "check_every": 4}
    with Shifting([FakeEngine() for _ in range(3)], frontend=FakeFrontend(), probe_interval=60.0, mobility=mob) as c:
        msgs = [{"role": "user", "content": CODE}]
        c.base = len(c.run(c.router.encode_chat(msgs)))
        text, finish = chat(c, msgs, 20)
        (s,) = c.router.status()["sessions"]
        (m,) = s["migrations"]
        assert m["kind"] == "hard" and m["ok"] and m["at"] == "token 8"
        (g0, r0, _, out0), (g1, r1, turn, rest) = calls
        tokenizer = load_tokenizer(b3)
        one = "".join(e.text for e in text_events(((t, 0.0) for t in out0[:8] + rest), tokenizer.detokenizer,
                                                  set(tokenizer.eos_token_ids), [], 20))
        # the model's end tokens (generation_config's 4093 too) end the turn before max_tokens
        expect = "stop" if (out0[:8] + rest)[-1] in tokenizer.eos_token_ids else "length"
        assert (text, finish) == (one, expect)
        assert (g0, r0, g1, r1, turn) == (0, 0, 1, 8, out0[:8])
        assert len(rest) == 12 or (expect == "stop" and len(rest) < 12)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_kill_point_is_exact(bundles):
    """Slow: a kill after every k of both answers (CODE 1..23, JSON 1..39)."""
    exact, bad = 0, []
    for prompt, max_tokens in ((CODE, 24), (JSON, 40)):
        ks = list(range(1, max_tokens))
        for pair in (ks[i:i + 2] for i in range(0, len(ks), 2)):
            with ReplicaCluster(bundles / "g1", probe_interval=60.0) as c:
                whole = complete(c, prompt, max_tokens, [])
                for k in pair:
                    before, c.plan.k = len(c.plan.resumes), k
                    if complete(c, prompt, max_tokens, []) == whole and c.plan.resumes[before:] == [0, k]:
                        exact += 1
                    else:
                        bad.append((prompt[:12], k))
    assert not bad and exact == 62, bad
