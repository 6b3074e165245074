"""One contract, two engines: every assertion here runs against the test
fake (tests/fakes.FakeEngine) and a tiny real node (node.engine.Node), so the
cluster tests that run on the fake test what the node does
(node.contract.Engine says the rules)."""

from __future__ import annotations

import mlx.core as mx
import pytest

import fakes
from mlxmoe.bundle.split import split
from mlxmoe.errors import AdmissionError, ContextOverflow, MlxMoeError, SessionBusy, Unsupported
from mlxmoe.model.load import load_bundle, load_tokenizer
from mlxmoe.node.contract import Engine, GenParams
from mlxmoe.node.engine import Node
from mlxmoe.wire import decode_tensor, encode_tensor

CONTEXT = 64
INFO_KEYS = {"model", "manifest_hash", "group", "n_groups", "sessions", "active_sessions", "free_kv",
             "context_limit", "kv_bits", "backend", "experts_op", "uptime_s"}


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "b"
    split(str(ckpt("qwen3_moe")), out, 2, bits=None, trunk_bits=None)
    return out


@pytest.fixture(params=["fake", "node"])
def make(request, bundle):
    """make(max_context=CONTEXT, one_session=False) -> a fresh engine of this kind.
    one_session: the KV budget holds one session's cache, not two."""

    def fake(max_context=CONTEXT, one_session=False):
        return fakes.FakeEngine(group=0, n_groups=2, max_context=max_context,
                                max_sessions=1 if one_session else None)

    def node(max_context=CONTEXT, one_session=False):
        n = Node(load_bundle(bundle, 0, dtype=mx.float32), load_tokenizer(bundle), kv_bits=None,
                 max_context=max_context)
        if one_session:  # a session's KV is allocated in blocks of SessionStore.step tokens
            n.sessions.budget = int(1.5 * n.sessions.step * n.sessions.per_token)
        return n

    return {"fake": fake, "node": node}[request.param]


def prompt_of(e: Engine, text: str = "the quick brown fox") -> list[int]:
    return e.encode_chat([{"role": "user", "content": text}])


def run(e: Engine, sid, prompt, **params):
    return list(e.generate(sid, prompt, GenParams(**params)))


def test_info_and_identity(make):
    e = make()
    info = e.info()
    assert INFO_KEYS <= set(info)
    assert info["manifest_hash"] == e.manifest.hash and info["model"] == e.manifest.model_id
    assert info["group"] == e.group == 0 and info["n_groups"] == e.manifest.n_groups == 2
    assert info["context_limit"] == CONTEXT and info["sessions"] == 0 and info["active_sessions"] == 0
    assert info["free_kv"] is None or isinstance(info["free_kv"], int)
    assert e.inbox is not None
    e.attach_cluster(b"k" * 32)


def test_generate_events_and_max_tokens(make):
    e = make()
    evs = run(e, "s", prompt_of(e), max_tokens=5)
    assert len(evs) == 5 or evs[-1].finish_reason == "stop"  # EOS may come first on a real model
    assert all(ev.finish_reason is None for ev in evs[:-1]) and evs[-1].finish_reason in ("stop", "length")
    assert all(isinstance(ev.token, int) and isinstance(ev.text, str) and ev.logprob <= 0 for ev in evs)
    again = run(e, "t", prompt_of(e), max_tokens=5)
    assert [ev.token for ev in again] == [ev.token for ev in evs]  # greedy: deterministic


def test_stop_string_ends_before_it(make):
    e = make()
    p = prompt_of(e, "say something long")
    text = "".join(ev.text for ev in run(e, None, p, max_tokens=20))
    assert len(text) > 4
    stop = text[2:4]
    cut = run(e, None, p, max_tokens=20, stop=[stop])
    assert "".join(ev.text for ev in cut) == text[:text.index(stop)]  # the stop string itself is not sent
    assert cut[-1].finish_reason == "stop"


def test_resumed_turn_continues_the_text_exactly(make):
    """A turn continued from its first k tokens (resume, resume_chars: the
    exact splice of a failover; open_end: a race's first tokens) streams the
    rest of the one-call text, for every k."""
    e = make()
    p = prompt_of(e, "say something long")
    whole = run(e, None, p, max_tokens=12)
    text = "".join(ev.text for ev in whole)
    for k in range(1, len(whole)):
        for head in (whole[:k], run(e, None, p, max_tokens=k, open_end=True)):
            sent = "".join(ev.text for ev in head)
            rest = run(e, None, p + [ev.token for ev in head], max_tokens=12 - k, resume=k, resume_chars=len(sent))
            assert sent + "".join(ev.text for ev in rest) == text, k
    with pytest.raises(MlxMoeError, match="params.resume"):
        run(e, None, p, max_tokens=2, resume=len(p))


def test_context_limit(make):
    e = make()
    p = prompt_of(e)
    long = (p * CONTEXT)[:CONTEXT]
    with pytest.raises(ContextOverflow, match="context limit"):
        e.generate("s", long, GenParams(max_tokens=1))  # raised before the first event
    with pytest.raises(ContextOverflow):
        e.prefill("s", long)
    near = long[:CONTEXT - 3]  # fits; max_tokens is cut to what the context has left
    evs = run(e, "s", near, max_tokens=50)
    assert len(evs) <= 3 and (len(evs) == 3 or evs[-1].finish_reason == "stop")
    assert evs[-1].finish_reason in ("length", "stop")


def test_bad_requests(make):
    e = make()
    with pytest.raises(MlxMoeError, match="non-empty"):
        e.generate("s", [], GenParams())
    with pytest.raises(MlxMoeError, match="outside the vocabulary"):
        e.generate("s", [1, 10**9], GenParams())
    with pytest.raises(MlxMoeError, match="max_tokens"):
        e.generate("s", prompt_of(e), GenParams(max_tokens=0))


def test_top_logprobs_and_logit_bias(make):
    e = make()
    evs = run(e, "s", prompt_of(e), max_tokens=4, top_logprobs=3)
    for ev in evs:
        lps = [t["logprob"] for t in ev.top_logprobs]
        assert len(lps) == 3 and lps == sorted(lps, reverse=True) and ev.logprob <= lps[0] + 1e-5
        assert all(isinstance(t["token"], int) and isinstance(t["text"], str) for t in ev.top_logprobs)
    assert all(ev.top_logprobs is None for ev in run(e, "t", prompt_of(e), max_tokens=2))
    with pytest.raises(MlxMoeError, match="logit_bias"):
        e.generate("u", prompt_of(e), GenParams(logit_bias={str(10 ** 8): 1.0}))


def test_sessions_reuse_close_unknown(make):
    e = make()
    p = prompt_of(e)
    first = run(e, "s", p, max_tokens=4)
    held = p + [ev.token for ev in first]
    assert e.prefill("s", held) == 0  # the session holds the prompt and every generated token
    assert e.info()["sessions"] == 1
    longer = held + e.encode(" and more")
    assert e.prefill("s", longer) == len(longer) - len(held)  # only the new suffix is computed
    assert e.close_session("s") is True and e.close_session("s") is False
    assert e.info()["sessions"] == 0
    with pytest.raises(KeyError):
        e.export_session("s")
    assert e.prefill("fresh", p) == len(p)


def test_export_import_round_trip(make):
    a, b = make(), make()
    p = prompt_of(a)
    run(a, "s", p, max_tokens=3)
    state = a.export_session("s")
    assert {"id", "tokens", "caches", "manifest"} <= set(state) and state["id"] == "s" and state["caches"]
    assert state["manifest"] == a.manifest.hash and state["tokens"][:len(p)] == p
    assert b.import_session(state) == "s"
    assert b.prefill("s", state["tokens"]) == 0  # the cache came along
    more = state["tokens"] + b.encode(" next")
    assert [ev.token for ev in run(b, "s", more, max_tokens=4)] == [ev.token for ev in run(a, "s", more, max_tokens=4)]
    with pytest.raises(MlxMoeError, match="manifest"):
        b.import_session({**state, "manifest": "another"})


def test_session_busy_while_streaming(make):
    e = make()
    p = prompt_of(e)
    it = e.generate("s", p, GenParams(max_tokens=8))
    next(it)
    assert e.info()["active_sessions"] == 1
    with pytest.raises(SessionBusy):
        e.generate("s", p, GenParams(max_tokens=2))
    with pytest.raises(SessionBusy):
        e.prefill("s", p)
    with pytest.raises(SessionBusy):
        e.export_session("s")
    list(it)
    assert e.info()["active_sessions"] == 0
    assert e.export_session("s")["id"] == "s"


def test_admission(make):
    e = make(one_session=True)
    p = prompt_of(e)
    it = e.generate("a", p, GenParams(max_tokens=8))
    next(it)  # "a" holds its cache and is generating: nothing to evict
    with pytest.raises(AdmissionError) as ei:
        e.generate("b", p, GenParams(max_tokens=2))
    assert ei.value.status == 503 and ei.value.retry_after > 0
    list(it)
    assert run(e, "b", p, max_tokens=2)  # "a" is idle now: evicted to make room
    assert e.info()["sessions"] == 2  # ...but kept: its transcript re-prefills later


def test_experts_op(make):
    e = make()
    spec = e.info()["experts_op"]
    if spec is None:  # an engine without remote experts refuses clearly (501, no retry)
        with pytest.raises(Unsupported) as ei:
            e.experts(0, encode_tensor(mx.zeros((1, 8))))
        assert ei.value.status == 501
        return
    layer, hidden = spec["layers"][0], spec["hidden"]
    y = decode_tensor(e.experts(layer, encode_tensor(mx.ones((3, hidden)))))
    assert y.shape == (3, hidden)
    with pytest.raises(MlxMoeError, match="not on this node"):
        e.experts(layer, encode_tensor(mx.ones((1, hidden))), ids=[10**6])
