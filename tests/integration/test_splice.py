"""Exact splice (docs/ARCHITECTURE.md): a turn continued on another node after
a failover or migration streams exactly the text one node would have. The
pure part (node.stream.text_events resumed at every token, with mlx-lm's
SPMStreamingDetokenizer, partial UTF-8 characters and stop strings; the
router's splice_params), the resume fields' validation, and FakeEngine nodes
behind a real router failing mid-stream right before a space and inside a
multi-byte character."""

from __future__ import annotations

import openai
import pytest

import fakes
from fakes import (ByteDetokenizer, FakeEngine, FakeFrontend, LocalCluster, encode, encode_chat,
                   next_token_unicode, spm_detokenizer)
from mlxmoe import wire
from mlxmoe.cluster.router.turn import splice_params
from mlxmoe.errors import MlxMoeError
from mlxmoe.node.contract import GenParams
from mlxmoe.node.stream import text_events

pytestmark = pytest.mark.timeout(60)
PROMPT = encode("<user>tell me a story\n<assistant>")


def tokens(n: int, prompt=PROMPT) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token_unicode(ctx))
    return ctx[len(prompt):]


def run(toks, stops=(), max_tokens=None, resume=(), sent=0, detok=spm_detokenizer):
    evs = list(text_events(((t, -0.1) for t in toks), detok(), set(), list(stops),
                           max_tokens or len(toks), resume, sent))
    return "".join(e.text for e in evs), [e.token for e in evs], evs[-1].finish_reason if evs else None


def spliced(toks, k, stops=(), fresh=False):
    """Node A streams toks[:k] and dies; node B continues the turn from there."""
    n = len(toks)
    evs = list(text_events(((t, -0.1) for t in toks[:k]), spm_detokenizer(), set(), list(stops), n))
    a = "".join(e.text for e in evs)
    if evs and evs[-1].finish_reason:
        return a, evs[-1].finish_reason
    resume, sent = ((), 0) if fresh else (toks[:k], len(a))
    b, _, finish = run(toks[k:], stops, n - k, resume, sent)
    return a + b, finish


def test_the_stream_has_what_the_splice_must_survive():
    toks = tokens(60)
    text = run(toks)[0]
    assert text == bytes(toks).decode(errors="replace").removeprefix(" ")  # SPM drops the turn's leading space
    assert any(t == 32 for t in toks[1:]) and any(0x80 <= t < 0xC0 for t in toks)  # spaces; inside characters
    assert "ж" in text and "€" in text and "ü" in text


@pytest.mark.parametrize("stops", [(), ("b c",), ("€d", "zz"), (" \n",)])
def test_resumed_text_events_equal_one_run_at_every_token(stops):
    toks = tokens(60)
    whole, _, finish = run(toks, stops)
    for k in range(1, len(toks)):
        assert spliced(toks, k, stops) == (whole, finish), k


def test_a_fresh_detokenizer_is_what_loses_text():
    """Without resuming, the old behaviour: the leading space after the splice
    and a character split by it are lost (the test above is not vacuous)."""
    toks = tokens(60)
    whole = run(toks)[0]
    space = next(k for k in range(1, 60) if toks[k] == 32)
    inside = next(k for k in range(1, 60) if 0x80 <= toks[k] < 0xC0)
    assert spliced(toks, space, fresh=True)[0] != whole
    assert spliced(toks, inside, fresh=True)[0] != whole
    assert spliced(toks, space)[0] == whole and spliced(toks, inside)[0] == whole


def test_held_back_stop_prefix_at_the_splice_is_delivered_or_stops():
    toks = encode("ab cd ef")
    # the kill lands while " c" is held back as a prefix of " cx": node B delivers it
    assert spliced(toks, 4, (" cx",)) == (run(toks, (" cx",))[0], "length") == ("ab cd ef", "length")
    # the stop string straddles the splice: node B still stops before it
    assert spliced(toks, 4, (" cd",)) == ("ab", "stop")


def test_resume_with_byte_detokenizer_and_eos():
    toks = encode("hello world")
    full = list(text_events(((t, 0.0) for t in toks + [7]), ByteDetokenizer(), {7}, [], 50))
    b = list(text_events(((t, 0.0) for t in toks[5:] + [7]), ByteDetokenizer(), {7}, [], 45, toks[:5], 5))
    assert "".join(e.text for e in full[:5] + b) == "hello world" and b[-1].finish_reason == "stop"


def test_splice_params():
    p = GenParams(max_tokens=20, temperature=0.0, stop=["x"])
    assert splice_params(p, 0, 0) == p  # a first connect sends what it always did
    assert splice_params(p, 7, 9) == GenParams(max_tokens=13, temperature=0.0, stop=["x"], resume=7, resume_chars=9)
    assert p == GenParams(max_tokens=20, temperature=0.0, stop=["x"])


@pytest.mark.parametrize("resume,chars,field", [(-1, 0, "params.resume"), (5, 0, "params.resume"),
                                                (9, 0, "params.resume"), (0, 3, "params.resume_chars"),
                                                (2, -1, "params.resume_chars")])
def test_bad_resume_fields_are_refused_before_any_token(resume, chars, field):
    e = FakeEngine()
    with pytest.raises(MlxMoeError, match=field):
        e.generate("s", [1, 2, 3, 4, 5], GenParams(max_tokens=3, resume=resume, resume_chars=chars))
    assert e.generated == 0


@pytest.mark.parametrize("value", ["3", 1.5, None, True, [1]])
def test_resume_fields_on_the_wire_must_be_integers(value):
    for key in ("resume", "resume_chars"):
        with pytest.raises(wire.WireError) as ei:
            wire.check_schema({"max_tokens": 3, key: value}, wire.PARAMS_SCHEMA, "body.params")
        assert ei.value.status == 400 and f"body.params.{key}" in str(ei.value)


def test_resume_past_the_text_delivers_nothing_twice():
    """resume_chars past what the tokens decode to (a confused router) never
    repeats text: the node delivers only what lies beyond it."""
    toks = encode("abcdef")
    assert run(toks[3:], (), 3, toks[:3], 10, ByteDetokenizer)[0] == ""


# ---------------------------------------------------------------- through the router

def stream_text(c, msgs, max_tokens, **kw):
    cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=20)
    text, finish = "", None
    for ch in cl.chat.completions.create(model="fake-moe", messages=msgs, max_tokens=max_tokens, stream=True, **kw):
        for choice in ch.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, c.router.status()["counters"]["failovers"]


MSGS = [{"role": "user", "content": "topic1 tell me a story"}]


def one_node_text(n, stop=()):
    evs = FakeEngine(spm=True, unicode=True).generate(None, encode_chat(MSGS), GenParams(max_tokens=n, stop=list(stop)))
    return "".join(e.text for e in evs)


def split_points(n=40):
    toks = tokens(n, encode_chat(MSGS))
    space = [k for k in range(1, n) if toks[k] == 32]
    inside = [k for k in range(1, n) if 0x80 <= toks[k] < 0xC0]
    return sorted({space[0], space[-1], inside[0], inside[-1], 1, n // 2})


@pytest.mark.parametrize("k", split_points())
def test_failover_through_the_router_is_exact(k):
    engines = [FakeEngine(group=g, spm=True, unicode=True, fail_after=k if g == 1 else None) for g in range(3)]
    with LocalCluster(engines, frontend=FakeFrontend()) as c:
        text, finish, failovers = stream_text(c, MSGS, 40)
    assert (text, finish, failovers) == (one_node_text(40), "length", 1)


def test_failover_with_a_stop_string_across_the_splice():
    whole = one_node_text(40)
    stop = whole[20:24]
    k = len(encode(whole[:22])) + 1  # the node dies inside the stop string (it is held back)
    engines = [FakeEngine(group=g, spm=True, unicode=True, fail_after=k if g == 1 else None) for g in range(3)]
    with LocalCluster(engines, frontend=FakeFrontend()) as c:
        text, finish, failovers = stream_text(c, MSGS, 40, stop=[stop])
    assert (text, finish, failovers) == (one_node_text(40, [stop]), "stop", 1)
    assert text == whole[:whole.find(stop)]


class Shifting(FakeFrontend):
    """Group 1 wins once the transcript is `at` tokens past the prompt."""

    base = at = None

    def score(self, tokens):
        sc = super().score(tokens)
        if self.base is not None and len(tokens) >= self.base + self.at:
            sc.scores = {0: 0.2, 1: 0.7, 2: 0.1}
        return sc


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("where", ["space", "inside"])
def test_migration_mid_turn_is_exact(mode, where):
    msgs = [{"role": "user", "content": "tell me a story"}]
    toks = tokens(40, encode_chat(msgs))
    at = next(k for k in range(4, 40) if (toks[k] == 32 if where == "space" else 0x80 <= toks[k] < 0xC0))
    front = Shifting(fixed={0: 0.8, 1: 0.11, 2: 0.1})
    front.base, front.at = len(encode_chat(msgs)), at
    engines = [FakeEngine(group=g, spm=True, unicode=True) for g in range(3)]
    with LocalCluster(engines, frontend=front, probe_interval=60.0,
                      mobility={"mode": mode, "checks": 1, "check_every": 1}) as c:
        cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=20)
        out = cl.chat.completions.create(model="fake-moe", messages=msgs, max_tokens=40)
        (s,) = c.router.status()["sessions"]
    (m,) = s["migrations"]
    assert m["kind"] == mode and m["ok"] and m["at"] == f"token {at}"
    evs = FakeEngine(spm=True, unicode=True).generate(None, encode_chat(msgs), GenParams(max_tokens=40))
    assert out.choices[0].message.content == "".join(e.text for e in evs)


@pytest.mark.parametrize("params,field", [
    ({"resume": 99}, "params.resume"), ({"resume": -1}, "params.resume"), ({"resume_chars": 5}, "params.resume_chars"),
    ({"resume": 2, "resume_chars": -3}, "params.resume_chars"), ({"resume": "2"}, "body.params.resume"),
    ({"resume_chars": 2.5}, "body.params.resume_chars"), ({"resume": 1 << 62}, "params.resume"),
    ({"open_end": 1}, "body.params.open_end")])
def test_hostile_resume_over_the_wire_is_a_clear_400(params, field):
    import aiohttp

    from mlxmoe.cluster.client import NodeClient
    from mlxmoe.errors import RpcError

    async def call(c):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fakes.client_context())) as http:
            n = NodeClient(http, c.node_url(0), c.key, c.router.manifest_hash)
            try:
                return [f async for f in n.generate("s1", [1, 2, 3, 4], {"max_tokens": 3, **params})]
            except RpcError as e:
                return e
            finally:
                assert [f async for f in n.generate("s2", [1, 2, 3], {"max_tokens": 2})][-1]["t"] == "end"

    with LocalCluster([FakeEngine()]) as c:
        e = c.run(call(c))
        assert c.engines[0].generated == 2  # only the good request after it ran
    assert getattr(e, "status", None) == 400 and field in e.message, e


def test_open_end_holds_back_what_a_final_call_would_flush():
    toks = encode("ab cd") + [0xE2, 0x82, 0xAC] + encode(" ef")  # "ab cd€ ef"
    for k in range(1, len(toks)):
        first = list(text_events(((t, 0.0) for t in toks[:k]), spm_detokenizer(), set(), [" cx"], k, open_end=True))
        a = "".join(e.text for e in first)
        assert first[-1].finish_reason == "length" and len(first) == k
        b, _, _ = run(toks[k:], [" cx"], len(toks) - k, toks[:k], len(a))
        assert a + b == "ab cd€ ef", k


@pytest.mark.parametrize("where", ["space", "inside"])
def test_race_continuation_is_exact(where):
    msgs = [{"role": "user", "content": "tell me a story"}]
    toks = tokens(30, encode_chat(msgs))
    k = next(i for i in range(2, 30) if (toks[i] == 32 if where == "space" else 0x80 <= toks[i] < 0xC0))
    engines = [FakeEngine(group=g, spm=True, unicode=True) for g in range(3)]
    with LocalCluster(engines, frontend=FakeFrontend(fixed={0: 0.5, 1: 0.45, 2: 0.1}), probe_interval=60.0,
                      mobility={"race_tokens": k}) as c:
        cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=20)
        text = ""
        for ch in cl.chat.completions.create(model="fake-moe", messages=msgs, max_tokens=30, stream=True,
                                             extra_body={"mlxmoe": {"mode": "race"}}):
            text += "".join(choice.delta.content or "" for choice in ch.choices)
        assert c.router.status()["counters"]["races"] == 1
    evs = FakeEngine(spm=True, unicode=True).generate(None, encode_chat(msgs), GenParams(max_tokens=30))
    assert text == "".join(e.text for e in evs)
