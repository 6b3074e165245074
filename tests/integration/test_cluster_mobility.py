"""Routing modes on the router side (issue 8): mode selection and validation,
soft migration with hysteresis, hard migration (and killing either node
midway), race placement, onehop params. FakeEngine nodes where the model adds
nothing (their output depends only on the context, so "nothing lost" is an
exact comparison); real nodes of the committed reference model for greedy
token identity."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest


import fakes
from fakes import FakeEngine, FakeFrontend, LocalCluster, encode_chat, expected_text
from mlxmoe.cluster.mobility import Mobility, load_router_config
from mlxmoe.cluster.node_server import SELF_CHECK
from mlxmoe.cluster.sessionview import session_ref

pytestmark = pytest.mark.timeout(90)
REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"


class Engine(FakeEngine):
    """FakeEngine that records generate params, can bias its log-probs (race)
    and can be slow to export/import (to kill a node midway)."""

    def __init__(self, *a, lp_bias: float = 0.0, slow_state: float = 0.0, **kw):
        super().__init__(*a, **kw)
        self.lp_bias, self.slow_state = lp_bias, slow_state
        self.params: list[dict] = []
        self.imported: list[str] = []

    def generate(self, session_id, prompt, params):
        if session_id != SELF_CHECK:  # the node's start-up check is not a chat
            self.params.append(params.to_dict())
        for ev in super().generate(session_id, prompt, params):
            ev.logprob += self.lp_bias
            yield ev

    def export_session(self, session_id):
        time.sleep(self.slow_state)
        return super().export_session(session_id)

    def import_session(self, state):
        time.sleep(self.slow_state)
        self.imported.append(state["id"])
        return super().import_session(state)


def client(c, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=30, **kw)


def chat(cl, messages, **kw):
    model = cl.models.list().data[0].id  # the router refuses other names (404 model_not_found)
    r = cl.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)
    return r.headers, r.parse()


def session(c, sid):
    return next(s for s in c.router.status()["sessions"] if s["id"] == sid)


class Conversation:
    """A multi-turn chat with one session id; checks every reply is exactly
    what a FakeEngine produces for the whole transcript."""

    def __init__(self, c, hint="conv", mode=None, max_tokens=6):
        self.c, self.msgs, self.max_tokens = c, [], max_tokens
        self.cl = client(c, default_headers={"X-Session-Id": hint})
        self.extra = {"extra_body": {"mlxmoe": {"mode": mode}}} if mode else {}
        self.headers = None

    def turn(self, text):
        self.msgs.append({"role": "user", "content": text})
        self.headers, out = chat(self.cl, self.msgs, max_tokens=self.max_tokens, **self.extra)
        self.last = out
        reply = out.choices[0].message.content
        assert reply == expected_text(encode_chat(self.msgs), self.max_tokens)  # nothing lost or repeated
        assert out.usage.prompt_tokens == len(encode_chat(self.msgs))
        self.msgs.append({"role": "assistant", "content": reply})
        return self.headers


def kill_later(c, i, delay) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), c.kill(i)))
    t.start()
    return t


def cluster(engines, fixed=None, **mob):
    front = FakeFrontend(fixed=dict(fixed or {0: 0.8, 1: 0.11, 2: 0.1}))
    return LocalCluster(engines, frontend=front, mobility=mob, probe_interval=60.0)


# ---------------------------------------------------------------- selection and validation

@pytest.mark.parametrize("body,header,param", [
    ({"mlxmoe": "race"}, None, "mlxmoe"),
    ({"mlxmoe": {"mode": "fastest"}}, None, "mlxmoe.mode"),
    ({"mlxmoe": {"mode": 3}}, None, "mlxmoe.mode"),
    ({"mlxmoe": {"prefer": "fast"}}, None, "mlxmoe.prefer"),
    ({"mlxmoe": {"prefer": 1}}, None, "mlxmoe.prefer"),
    ({"mlxmoe": {"mdoe": "race"}}, None, "mlxmoe.mdoe"),
    ({}, "teleport", "X-Mlxmoe-Mode"),
    ({"mlxmoe": {"mode": "race"}}, "soft", "X-Mlxmoe-Mode"),
])
def test_malformed_mode_is_400_naming_the_field(body, header, param):
    import urllib.error
    import urllib.request
    with cluster([Engine(group=g) for g in range(3)]) as c:
        for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/completions", {"prompt": "hi"})):
            req = urllib.request.Request(c.api_url + path, data=json.dumps({"model": "fake-moe", **extra, **body}).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"X-Mlxmoe-Mode": header} if header else {})})
            with pytest.raises(urllib.error.HTTPError) as ei:
                urllib.request.urlopen(req, timeout=10)
            err = json.loads(ei.value.read())["error"]
            assert ei.value.code == 400 and err["param"] == param, err
        assert c.router.status()["sessions"] == [] and all(not e.sessions for e in c.engines)


def test_config_and_settings_validation(tmp_path):
    assert Mobility.from_dict({"mode": "race", "race_tokens": 4}).race_tokens == 4
    for bad, field in (({"mode": "fast"}, "router.mode"), ({"margin": "x"}, "router.margin"),
                       ({"checks": 0}, "router.checks"), ({"race_candidates": 5}, "router.race_candidates"),
                       ({"warp": 1}, "router.warp"), ({"check_every": True}, "router.check_every")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            Mobility.from_dict(bad)
    f = tmp_path / "c.toml"
    f.write_text('[[peers]]\nurl = "http://10.0.0.1:7420"\n[router]\nmode = "soft"\nchecks = 3\n')
    assert load_router_config(f) == {"mode": "soft", "checks": 3}
    f.write_text('[router]\nmode = "nope"\n')
    with pytest.raises(ValueError, match="router.mode"):
        load_router_config(f)
    f.write_text('router = 3\n')
    with pytest.raises(ValueError, match=r"\[router\]"):
        load_router_config(f)
    r = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "serve", str(tmp_path), "--mode", "warp"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--mode" in r.stderr


def test_mode_is_remembered_per_session_and_defaults_to_router_mode():
    with cluster([Engine(group=g) for g in range(3)], mode="hard") as c:
        h = Conversation(c, "a", mode="soft").turn("first")
        assert h["x-mlxmoe-mode"] == "soft"
        conv = Conversation(c, "a")  # same session, no mode named: still soft
        conv.msgs = [{"role": "user", "content": "first"}]
        h2, _ = chat(conv.cl, conv.msgs + [{"role": "user", "content": "more"}], max_tokens=2)
        assert h2["x-mlxmoe-mode"] == "soft" and h2["x-mlxmoe-session"] == h["x-mlxmoe-session"]
        h3, _ = chat(client(c), [{"role": "user", "content": "x"}], max_tokens=2)  # router default
        assert h3["x-mlxmoe-mode"] == "hard"
        h4, _ = chat(client(c, default_headers={"X-Mlxmoe-Mode": "Pin"}), [{"role": "user", "content": "y"}],
                     max_tokens=2)
        assert h4["x-mlxmoe-mode"] == "pin"
        # no switch yet: strictly local decode everywhere (no routing fields sent)
        assert all(p.get("routing") in (None, "local") for e in c.engines for p in e.params)


# ---------------------------------------------------------------- soft migration

def test_soft_migration_switches_after_hysteresis_only():
    engines = [Engine(group=g) for g in range(3)]
    with cluster(engines, mode="soft", margin=0.05, checks=2) as c:
        conv, front = Conversation(c, "soft"), c.frontend
        conv.turn("hello")  # placed on group 0
        sid = conv.headers["x-mlxmoe-session"]
        front.fixed = {0: 0.5, 1: 0.53, 2: 0.1}  # leads by less than the margin: no check counts
        conv.turn("t2")
        assert session(c, sid)["last_check"]["streak"] == 0
        front.fixed = {0: 0.3, 1: 0.6, 2: 0.1}  # group 1 wins once
        conv.turn("t3")
        front.fixed = {0: 0.3, 1: 0.1, 2: 0.6}  # another challenger: the streak starts over
        conv.turn("t4")
        st = session(c, sid)
        assert st["migrations"] == [] and st["routing"] == "local" and st["last_check"]["streak"] == 1
        conv.turn("t5")  # group 2 wins twice in a row: switch
        st = session(c, sid)
        assert st["expert_group"] == 2 and st["routing"] == "group" and st["node"] == c.peer_name(0)
        (m,) = st["migrations"]
        assert m["kind"] == "soft" and m["from"] == 0 and m["to"] == 2 and m["ok"] and m["at"] == "turn"
        p = engines[0].params[-1]  # the pinned node now calls group 2's node for every MoE layer
        assert p["routing"] == "group" and p["expert_group"] == 2 and p["peers"] == {"2": c.node_url(2)}
        assert all(e.params == [] for e in engines[1:])
        conv.turn("t6")  # stays switched; trunk and KV stay on node 0 (its cache is reused)
        assert engines[0].reused[-1][1] > 0 and session(c, sid)["expert_group"] == 2


@pytest.mark.parametrize("mode", ["onehop", "split"])
def test_onehop_and_split_pass_one_live_node_per_other_group(mode):
    engines = [Engine(group=g) for g in range(3)]
    with cluster(engines) as c:
        conv = Conversation(c, "oh", mode=mode)
        conv.turn("hello")
        p = engines[0].params[-1]
        assert p["routing"] == mode and p["peers"] == {"1": c.node_url(1), "2": c.node_url(2)}
        assert session(c, conv.headers["x-mlxmoe-session"])["routing"] == mode


class PeerFails(Engine):
    """Fails when asked to route through a peer, after `after` tokens."""

    def __init__(self, *a, after=0, **kw):
        super().__init__(*a, **kw)
        self.after = after

    def generate(self, session_id, prompt, params):
        # PeerError from inside the stream, as a node whose expert peer is lost
        self.peer_fail_after = self.after if params.routing == "group" else None
        return super().generate(session_id, prompt, params)


class LosesPeer(Engine):
    """Its onehop/split peer `lost` (a URL) is gone: a stream routed through it fails after `after`
    tokens (PeerError), as a node whose expert peer died mid-step."""

    def __init__(self, *a, after=3, **kw):
        super().__init__(*a, **kw)
        self.after, self.lost = after, None

    def generate(self, session_id, prompt, params):
        self.peer_fail_after = self.after if self.lost in params.peers.values() else None
        return super().generate(session_id, prompt, params)


@pytest.mark.parametrize("mode", ["onehop", "split"])
def test_a_lost_peer_is_replaced_by_a_node_of_its_group_and_the_text_is_kept(mode):
    engines = [LosesPeer(group=0), Engine(group=1), Engine(group=1), Engine(group=2)]
    with cluster(engines) as c:
        conv = Conversation(c, "lost", mode=mode)
        conv.turn("hello")
        used = engines[0].params[-1]["peers"]["1"]
        engines[0].lost = used
        c.kill([c.node_url(i) for i in range(4)].index(used))
        conv.turn("again")  # fails after 3 tokens, continues with group 1's other node: exact text
        spare = next(c.node_url(i) for i in (1, 2) if c.node_url(i) != used)
        assert engines[0].params[-1]["peers"] == {"1": spare, "2": c.node_url(3)}
        st = session(c, conv.headers["x-mlxmoe-session"])
        assert st["without_groups"] == [] and st["node"] == c.peer_name(0)
        assert "mlxmoe" not in conv.last.model_extra


@pytest.mark.parametrize("mode", ["onehop", "split"])
def test_a_lost_peer_with_no_other_node_of_its_group_is_told(mode):
    engines = [LosesPeer(group=0), Engine(group=1), Engine(group=2)]
    with cluster(engines) as c:
        conv = Conversation(c, "told", mode=mode)
        conv.turn("hello")
        engines[0].lost = c.node_url(2)
        c.kill(2)
        msgs = conv.msgs + [{"role": "user", "content": "again"}]
        chunks = list(conv.cl.chat.completions.create(model="fake-moe", messages=msgs, max_tokens=6, stream=True,
                                                      extra_body={"mlxmoe": {"mode": mode}}))
        last = chunks[-1].model_extra.get("mlxmoe") or {}
        assert last.get("without_groups") == [2] and "group(s) [2]" in last["note"]
        assert engines[0].params[-1]["peers"] == {"1": c.node_url(1)}
        assert session(c, conv.headers["x-mlxmoe-session"])["without_groups"] == [2]
        r = conv.cl.chat.completions.create(model="fake-moe", messages=msgs, max_tokens=6,
                                            extra_body={"mlxmoe": {"mode": mode}})
        assert r.model_extra["mlxmoe"]["without_groups"] == [2]


@pytest.mark.parametrize("after", [0, 3])
def test_soft_peer_failure_falls_back_to_local_on_the_same_node(after):
    engines = [PeerFails(group=0, after=after), Engine(group=1), Engine(group=2)]
    with cluster(engines, mode="soft", checks=1) as c:
        conv = Conversation(c, "pf")
        conv.turn("hello")
        c.frontend.fixed = {0: 0.2, 1: 0.7, 2: 0.1}
        h = conv.turn("switch")  # reply exact: the tokens before the failure are kept, the rest local
        st = session(c, h["x-mlxmoe-session"])
        assert h["x-mlxmoe-node"] == c.peer_name(0) and st["routing"] == "local"
        assert [m["kind"] for m in st["migrations"]] == ["soft", "fallback"]
        assert c.router.counters["failovers"] == 0


# ---------------------------------------------------------------- hard migration

def test_hard_migration_moves_kv_and_continues_exactly():
    engines = [Engine(group=g) for g in range(3)]
    with cluster(engines, mode="hard", checks=1) as c:
        conv = Conversation(c, "hard")
        conv.turn("hello")
        sid = conv.headers["x-mlxmoe-session"]
        c.frontend.fixed = {0: 0.2, 1: 0.7, 2: 0.1}
        h = conv.turn("now something for group one")
        assert h["x-mlxmoe-node"] == c.peer_name(1) and h["x-mlxmoe-group"] == "1"
        st = session(c, sid)
        (m,) = st["migrations"]
        assert m["kind"] == "hard" and m["ok"] and m["node_from"] == c.peer_name(0) and m["node_to"] == c.peer_name(1)
        assert engines[1].imported == [sid] and engines[1].reused[-1][1] > 0  # the moved cache was reused
        assert st["routing"] == "local" and c.router.counters["failovers"] == 0
        deadline = time.time() + 5
        while sid in engines[0].sessions and time.time() < deadline:  # the old copy is closed
            time.sleep(0.05)
        assert sid not in engines[0].sessions
        conv.turn("and more")  # local decode on the new node
        assert engines[1].params[-1].get("routing") in (None, "local")


def test_hard_migration_waits_while_the_source_still_streams():
    engines = [Engine(group=g) for g in range(3)]
    with cluster(engines, mode="hard", checks=1) as c:
        conv = Conversation(c, "busy")
        conv.turn("hello")
        sid = conv.headers["x-mlxmoe-session"]
        engines[0].busy.add(sid)  # a stream the node has not finished yet: export answers 409 session_busy
        threading.Thread(target=lambda: (time.sleep(0.4), engines[0].busy.discard(sid))).start()
        c.frontend.fixed = {0: 0.2, 1: 0.7, 2: 0.1}
        h = conv.turn("now something for group one")
        (m,) = session(c, sid)["migrations"]
        assert m["kind"] == "hard" and m["ok"] and m["ms"] >= 300 and h["x-mlxmoe-node"] == c.peer_name(1)


def test_hard_migration_of_a_long_session_falls_back_to_soft_or_stays():
    engines = [Engine(group=g) for g in range(3)]
    with cluster(engines, mode="hard", checks=1, hard_max_tokens=10) as c:
        conv = Conversation(c, "long")
        conv.turn("a first message that is longer than ten tokens")
        c.frontend.fixed = {0: 0.2, 1: 0.7, 2: 0.1}
        conv.turn("switch")
        (m,) = session(c, conv.headers["x-mlxmoe-session"])["migrations"]
        assert m["kind"] == "soft" and "hard_max_tokens" in m["note"] and engines[1].imported == []
        assert conv.headers["x-mlxmoe-node"] == c.peer_name(0)


def test_hard_migration_interrupted_by_killing_the_destination_loses_nothing():
    engines = [Engine(group=0), Engine(group=1, slow_state=1.0), Engine(group=2)]
    with cluster(engines, mode="hard", checks=1) as c:
        conv = Conversation(c, "kill-dst")
        conv.turn("hello")
        sid = conv.headers["x-mlxmoe-session"]
        c.frontend.fixed = {0: 0.2, 1: 0.7, 2: 0.1}
        killer = kill_later(c, 1, 0.4)  # dies while importing the session
        h = conv.turn("move me")  # (checked: reply exact, transcript intact)
        assert h["x-mlxmoe-node"] == c.peer_name(0)  # stayed where it was
        (m,) = session(c, sid)["migrations"]
        assert not m["ok"] and "import into" in m["hard_error"] and "no live node" in m["error"]
        assert sid in engines[0].sessions  # the old copy was never closed
        conv.turn("still here")
        assert engines[0].reused[-1][1] > len(encode_chat(conv.msgs[:1]))  # cache intact, reused
        killer.join(10)


def test_hard_migration_interrupted_by_killing_the_source_loses_nothing():
    engines = [Engine(group=0, slow_state=1.0), Engine(group=1), Engine(group=2)]
    with cluster(engines, mode="hard", checks=1) as c:
        conv = Conversation(c, "kill-src")
        conv.turn("hello")
        sid = conv.headers["x-mlxmoe-session"]
        c.frontend.fixed = {0: 0.2, 1: 0.7, 2: 0.1}
        killer = kill_later(c, 0, 0.4)  # dies while exporting the session
        h = conv.turn("move me")  # rebuilt on group 1 from the transcript, reply exact
        assert h["x-mlxmoe-node"] == c.peer_name(1)
        (m,) = session(c, sid)["migrations"]
        assert m["ok"] and m.get("rebuilt") and engines[1].imported == []
        conv.turn("still here")
        killer.join(10)


def test_hard_migration_every_n_tokens_mid_turn():
    class Shifting(FakeFrontend):  # group 1 wins once the transcript is 8 tokens past the prompt
        def score(self, tokens):
            sc = super().score(tokens)
            if self.base is not None and len(tokens) >= self.base + 8:
                sc.scores = {0: 0.2, 1: 0.7, 2: 0.1}
            return sc
    front = Shifting(fixed={0: 0.8, 1: 0.11, 2: 0.1})
    front.base = None
    engines = [Engine(group=g) for g in range(3)]
    with LocalCluster(engines, frontend=front, mobility={"mode": "hard", "checks": 1, "check_every": 4},
                      probe_interval=60.0) as c:
        msgs = [{"role": "user", "content": "tell me"}]
        front.base = len(encode_chat(msgs))
        h, out = chat(client(c), msgs, max_tokens=20, extra_body={"user": "mid"})
        assert out.choices[0].message.content == expected_text(encode_chat(msgs), 20)
        (m,) = session(c, h["x-mlxmoe-session"])["migrations"]
        assert m["kind"] == "hard" and m["ok"] and m["at"] == "token 8"
        assert c.router.status()["counters"]["failovers"] == 0 and len(engines[1].params) == 1


# ---------------------------------------------------------------- race

def test_race_pins_best_mean_logprob_streams_its_tokens_and_closes_losers():
    engines = [Engine(group=0, lp_bias=-0.5), Engine(group=1, lp_bias=0.0), Engine(group=2, lp_bias=-1.0)]
    with cluster(engines, race_tokens=4) as c:
        msgs = [{"role": "user", "content": "race me"}]
        stream = client(c, default_headers={"X-Mlxmoe-Mode": "race", "X-Session-Id": "r"}).chat.completions.create(
            model="fake-moe", messages=msgs, max_tokens=12, stream=True, logprobs=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == expected_text(encode_chat(msgs), 12)  # every token exactly once
        (st,) = c.router.status()["sessions"]
        assert st["group"] == 1 and st["race"]["winner"] == 1 and st["race"]["tokens"] == 4
        lps = st["race"]["mean_logprob"]
        assert set(lps) == {"0", "1", "2"} and max(lps, key=lps.get) == "1"
        assert [len(e.params) for e in engines] == [1, 2, 1]  # the winner continued after K tokens...
        assert engines[1].reused[-1][1] == len(encode_chat(msgs)) + 4  # ...reusing prompt + K tokens
        deadline = time.time() + 5
        while (engines[0].sessions or engines[2].sessions) and time.time() < deadline:
            time.sleep(0.05)
        assert not engines[0].sessions and not engines[2].sessions  # losers closed
        assert c.router.status()["counters"]["races"] == 1


def test_race_with_a_failing_candidate_and_an_answer_shorter_than_k():
    engines = [Engine(group=0, lp_bias=-0.5), Engine(group=1, fail_after=1, lp_bias=1.0), Engine(group=2)]
    with cluster(engines, race_tokens=8) as c:
        msgs = [{"role": "user", "content": "short"}]
        h, out = chat(client(c), msgs, max_tokens=5, extra_body={"mlxmoe": {"mode": "race"}, "user": "r2"})
        assert out.choices[0].message.content == expected_text(encode_chat(msgs), 5)
        assert out.choices[0].finish_reason == "length" and h["x-mlxmoe-group"] == "2"
        (st,) = c.router.status()["sessions"]
        assert st["race"]["mean_logprob"]["1"] is None and [len(e.params) for e in engines] == [1, 1, 1]


# ---------------------------------------------------------------- real nodes (reference model)

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("mob") / "b"
    r = subprocess.run([sys.executable, "-m", "mlxmoe.cli", "split", str(REFERENCE), str(out), "--groups", "3",
                        "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


class RealCluster(LocalCluster):
    """Real nodes (one per entry of `groups`) + the real trunk front end, whose
    scores a test can override (`front.force`) to trigger a migration."""

    def __init__(self, bundle, groups, **router_kw):
        super().__init__([FakeEngine(group=g) for g in groups], frontend=FakeFrontend(), **router_kw)
        self.bundle, self.groups, self.force = str(bundle), groups, None

    async def _start(self):
        from mlxmoe.cluster.api import start_router
        from mlxmoe.cluster.node_server import start_node
        from mlxmoe.cluster.router import Router
        from mlxmoe.node.engine import Node
        from mlxmoe.node.trunk import TrunkFrontend

        for i, g in enumerate(self.groups):
            self.nodes.append(await start_node(None, self.key, "127.0.0.1", 0, advertise=False, name=f"node{i}",
                                               factory=lambda g=g: Node.load(self.bundle, g, verify=False),
                                               tls=self.tls))
        outer = self

        class Forced(TrunkFrontend):
            def score(self, tokens):
                sc = super().score(tokens)
                if outer.force is not None:
                    sc.scores = dict(outer.force)
                return sc

        router = Router(None, self.key, frontend_factory=lambda: Forced.load(self.bundle, verify=False),
                        static_peers=[n.url for n in self.nodes], mdns=False, tls=self.tls, **self.router_kw)
        self.running = await start_router(router, "127.0.0.1", 0)


def test_real_hard_migration_continues_with_the_same_greedy_tokens(bundle):
    """Turn 2 of a session hard-migrated from group 0 to group 1 equals, token
    for token, the same session moved by hand (export on node 0, import on
    node 1, generate there): the router moves exactly the KV and continues
    from it, with nothing lost or re-prefilled. And a session moved between
    two nodes of the same group continues exactly like one never moved."""
    import asyncio

    import aiohttp

    from mlxmoe.cluster.client import NodeClient

    with RealCluster(bundle, [0, 1, 0], mobility={"mode": "hard", "checks": 1}, probe_interval=60.0) as c:
        c.force = {0: 0.9, 1: 0.05, 2: 0.05}
        cl = client(c, default_headers={"X-Session-Id": "real"})
        m1 = [{"role": "user", "content": "def add(a, b):"}]
        h1, o1 = chat(cl, m1, max_tokens=8)
        m2 = m1 + [{"role": "assistant", "content": o1.choices[0].message.content},
                   {"role": "user", "content": "import os"}]
        c.force = {0: 0.1, 1: 0.8, 2: 0.1}
        h2, o2 = chat(cl, m2, max_tokens=8, logprobs=True)
        assert h1["x-mlxmoe-group"] == "0" and h2["x-mlxmoe-group"] == "1"
        sid = h2["x-mlxmoe-session"]
        (m,) = session(c, sid)["migrations"]
        assert m["kind"] == "hard" and m["ok"] and m["state_tokens"] > 0

        async def by_hand():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fakes.client_context())) as http:
                n0, n1, n2 = (NodeClient(http, c.node_url(i), c.key, c.router.manifest_hash) for i in range(3))
                p1, p2 = await c.router.encode_chat(m1), await c.router.encode_chat(m2)

                async def gen(n, sid, p):
                    # repetition_penalty None: the model's default, as the API sends for a request without one
                    return [f async for f in n.generate(sid, p, {"max_tokens": 8, "repetition_penalty": None})
                            if f["t"] == "tok"]
                t1 = await gen(n0, "byhand", p1)
                state = await n0.call("export_session", {"session": "byhand"})
                await n1.call("import_session", {"state": state})
                moved = await gen(n1, "byhand", p2)
                # same group: node 2 (group 0) continues a session exported from node 0 like node 0 itself
                state = await n0.call("export_session", {"session": "byhand"})
                await n2.call("import_session", {"state": state})
                same_a = await gen(n2, "byhand", p2)
                same_b = await gen(n0, "byhand", p2)
                return t1, moved, same_a, same_b
        t1, moved, same_a, same_b = c.run(by_hand(), 60)
        assert "".join(f["text"] for f in t1) == o1.choices[0].message.content
        assert o2.choices[0].message.content == "".join(f["text"] for f in moved)
        assert [lp.logprob for lp in o2.choices[0].logprobs.content] == pytest.approx(
            [f["logprob"] for f in moved], abs=1e-5)
        assert [f["token"] for f in same_a] == [f["token"] for f in same_b]


def test_real_race_continues_on_the_winner_like_a_pinned_session(bundle):
    """Race K=3 of 10 tokens: the answer equals greedy generation pinned to the
    winner's group from the start (the winner's cache holds prompt + K)."""
    with RealCluster(bundle, [0, 1, 2], mobility={"race_tokens": 3}, probe_interval=60.0) as c:
        msgs = [{"role": "user", "content": "Der Hund"}]
        h, out = chat(client(c), msgs, max_tokens=10, extra_body={"mlxmoe": {"mode": "race"}, "user": "rr"})
        st = session(c, h["x-mlxmoe-session"])
        lps = st["race"]["mean_logprob"]
        assert st["race"]["winner"] == int(max(lps, key=lambda g: lps[g] if lps[g] is not None else -1e9))
        c.force = {g: (0.9 if g == st["group"] else 0.05) for g in range(3)}
        h2, pinned = chat(client(c), msgs, max_tokens=10, extra_body={"user": "pinned"})
        assert h2["x-mlxmoe-group"] == str(st["group"])
        assert out.choices[0].message.content == pinned.choices[0].message.content


def test_real_soft_and_hard_migration_continue_identically_and_onehop_counts_calls(bundle):
    """Turn 2 after a switch to group 1: the soft-migrated session (KV stays on
    node 0, every MoE layer's experts computed by node 1) and the hard-migrated
    one (KV moved to node 1, decoded there) give the same greedy tokens. A
    onehop session's remote calls show up in /status."""
    with RealCluster(bundle, [0, 1, 2], mobility={"checks": 1}, probe_interval=60.0) as c:
        outs = {}
        for mode in ("soft", "hard"):
            c.force = {0: 0.9, 1: 0.05, 2: 0.05}
            cl = client(c, default_headers={"X-Session-Id": mode, "X-Mlxmoe-Mode": mode})
            m1 = [{"role": "user", "content": "def add(a, b):"}]
            _, o1 = chat(cl, m1, max_tokens=6)
            c.force = {0: 0.1, 1: 0.8, 2: 0.1}
            m2 = m1 + [{"role": "assistant", "content": o1.choices[0].message.content},
                       {"role": "user", "content": "import os"}]
            h, o2 = chat(cl, m2, max_tokens=8)
            outs[mode] = (h, o1.choices[0].message.content, o2.choices[0].message.content)
        (hs, s1, s2), (hh, h1, h2) = outs["soft"], outs["hard"]
        assert s1 == h1 and s2 == h2
        assert hs["x-mlxmoe-node"] == c.peer_name(0) and hh["x-mlxmoe-node"] == c.peer_name(1)
        st = {s["id"]: s for s in json.loads(urlopen(c.api_url + "/status"))["sessions"]}  # ids as their refs
        soft = st[session_ref(hs["x-mlxmoe-session"])]
        assert soft["routing"] == "group" and soft["remote_calls"] > 0 and soft["remote_bytes"] > 0
        assert st[session_ref(hh["x-mlxmoe-session"])]["remote_calls"] == 0
        c.force = None
        h, _ = chat(client(c, default_headers={"X-Mlxmoe-Mode": "onehop"}), [{"role": "user", "content": "Der"}],
                    max_tokens=4, extra_body={"user": "oh"})
        oh = next(s for s in json.loads(urlopen(c.api_url + "/status"))["sessions"]
                  if s["id"] == session_ref(h["x-mlxmoe-session"]))
        assert oh["mode"] == "onehop" and oh["routing"] == "onehop" and oh["remote_calls"] >= 0


def urlopen(url: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=20) as r:
        return r.read()


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_netns_modes_across_hosts(tmp_path):
    """Three `mlxmoe node` hosts and `mlxmoe serve` in network namespaces, found
    over mDNS (tools/bench_mobility.py's cluster): onehop calls other hosts,
    a hard migration moves a conversation that turns from prose to code to
    another host, race pins the best of three."""
    import netns
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"netns test skipped: {why}")
    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    import argparse

    import bench_mobility as bm
    from mlxmoe.ui.demo import ensure_bundle

    bundle = ensure_bundle(tmp_path, 3, quiet=True, equal=True)
    a = argparse.Namespace(delays=[], modes="onehop,hard,race", conversations=1, turns=3, tokens=4)
    rows = {r["mode"]: r for r in bm.run_cluster(a, str(bundle), tmp_path) if "mode" in r}
    assert all(r["via"] in ("direct", "netem") and 3 <= r["tokens"] <= 12 for r in rows.values())
    oh = rows["onehop"]
    assert oh["remote_calls_per_token"] > 0 and oh["node_node_bytes_per_token"] > 0
    (m,) = rows["hard"]["migrations"]
    assert m["kind"] == "hard" and m["ok"] and m["from"] != m["to"] and rows["hard"]["groups"] == [m["to"]]
    (race,) = rows["race"]["race"]
    lps = race["mean_logprob"]
    assert len(lps) == 3 and race["winner"] == int(max(lps, key=lps.get))
    assert rows["hard"]["remote_calls_per_token"] == 0 and rows["race"]["remote_calls_per_token"] == 0
