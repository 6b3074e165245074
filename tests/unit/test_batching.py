"""Continuous batching (node/batch.py): every row of a batched step gives what
the same session gives alone — mixed prompt lengths, mixed sampling settings,
rows finishing at different steps, rows joining mid-way, chunked prefill —
and the batch cache holds the same KV as each row's own cache."""

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxmoe.bundle.split import split
from mlxmoe.node.batch import Pace, padded_bytes
from mlxmoe.node.contract import PENDING, GenParams
from mlxmoe.node.engine import Node


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Unquantized (float32 compute on CPU), 2 groups, overlay {1}."""
    src = tiny.make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("src"), seed=3)
    out = tmp_path_factory.mktemp("b") / "b"
    split(str(src), out, 2, overlay={"all": [1]}, bits=None, trunk_bits=None, kv_bits=8)
    return out


def drive(node, jobs):
    """Run jobs as the engine worker does: each round, start the jobs due,
    then ask every running stream for one event (PENDING: none this round).
    jobs: (sid, prompt, params, round it starts). Returns ({sid: events}, the
    largest decoding batch seen)."""
    events, streams, widest = {j[0]: [] for j in jobs}, {}, 0
    rnd = 0
    while rnd <= max(j[3] for j in jobs) or streams:
        for sid, prompt, params, start in jobs:
            if start == rnd:
                streams[sid] = node.generate(sid, prompt, params)
        for sid, it in list(streams.items()):
            ev = next(it, None)
            if ev is None:
                del streams[sid]
            elif ev is not PENDING:
                events[sid].append(ev)
        widest = max(widest, len(node.batch.gen) if node.batch.gen is not None else 0)
        rnd += 1
    return events, widest


def alone(node, sid, prompt, params):
    return list(node.generate(sid, prompt, params))


def same(a, b):
    assert [e.token for e in a] == [e.token for e in b]
    assert "".join(e.text for e in a) == "".join(e.text for e in b)
    assert a[-1].finish_reason == b[-1].finish_reason
    np.testing.assert_allclose([e.logprob for e in a], [e.logprob for e in b], atol=1e-4)
    for x, y in zip(a, b):
        assert (x.top_logprobs is None) == (y.top_logprobs is None)
        if x.top_logprobs:
            assert [t["token"] for t in x.top_logprobs] == [t["token"] for t in y.top_logprobs]


def jobs_of(node):
    text = "the quick brown fox jumps over the lazy dog " * 4
    p = [node.encode(text[:n]) for n in (3, 40, 150)]
    return [
        ("short", p[0], GenParams(max_tokens=20), 0),
        ("sampled", p[1], GenParams(max_tokens=14, temperature=0.9, seed=7, top_k=50, top_logprobs=3), 0),
        ("long", p[2], GenParams(max_tokens=9, repetition_penalty=1.3, logit_bias={"5": 3.0}), 0),
        ("late", p[1][:25], GenParams(max_tokens=12, presence_penalty=0.5), 4),
        ("later", p[0] + p[0], GenParams(max_tokens=6, temperature=0.7, seed=1, min_p=0.05), 9),
    ]


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("group", [None, 0])
def test_batched_rows_equal_each_session_alone(bundle, kv_bits, group):
    node = Node.load(bundle, group, kv_bits=kv_bits)
    node.batch.pace = Pace(16, None)  # long prompts prefill over several steps, beside decoding rows, in the
    # same chunks as alone (paced by time, 8-bit KV's first chunk would differ)
    jobs = jobs_of(node)
    together, widest = drive(node, jobs)
    assert widest >= 3  # they really decoded together
    for sid, prompt, params, _ in jobs:
        same(together[sid], alone(node, sid + "-alone", prompt, params))
    assert not node.batch.rows and (node.batch.gen is None or not len(node.batch.gen))
    assert not any(s.busy for s in node.sessions.sessions.values())


def test_stop_string_ends_one_row_and_the_others_go_on(bundle):
    node = Node.load(bundle, 1, kv_bits=None)
    prompt = node.encode("the quick brown fox")
    free = alone(node, "free", prompt, GenParams(max_tokens=16))
    text = "".join(e.text for e in free)
    stop = text[len(text) // 3:len(text) // 3 + 2]
    jobs = [("stopped", prompt, GenParams(max_tokens=16, stop=[stop]), 0), ("free2", prompt, GenParams(max_tokens=16), 0)]
    together, _ = drive(node, jobs)
    same(together["free2"], free)
    cut = "".join(e.text for e in together["stopped"])
    assert together["stopped"][-1].finish_reason == "stop" and text.startswith(cut) and stop not in cut


def test_sessions_keep_their_cache_and_reuse_it_after_a_batched_turn(bundle):
    node = Node.load(bundle, 0, kv_bits=None)  # unquantized: the reused cache holds the same KV as a fresh prefill
    a, b = node.encode("def add(a, b):"), node.encode("le renard brun saute")
    together, _ = drive(node, [("a", a, GenParams(max_tokens=8), 0), ("b", b, GenParams(max_tokens=5), 0)])
    for sid, prompt in (("a", a), ("b", b)):
        s = node.sessions.sessions[sid]
        assert s.tokens == prompt + [e.token for e in together[sid]]
        assert all(c.offset == len(s.tokens) for c in s.cache)
    turn2 = node.sessions.sessions["a"].tokens + node.encode(" more")
    same(alone(node, "a", turn2, GenParams(max_tokens=6)), alone(node, "fresh", turn2, GenParams(max_tokens=6)))


def test_closing_a_stream_midway_frees_its_row(bundle):
    node = Node.load(bundle, 0, kv_bits=None)
    p = node.encode("the quick brown fox")
    one, two = node.generate("one", p, GenParams(max_tokens=30)), node.generate("two", p, GenParams(max_tokens=30))
    for _ in range(4):
        next(one), next(two)
    one.close()
    assert node.batch.gen is not None and len(node.batch.gen) == 1
    assert not node.sessions.sessions["one"].busy and node.sessions.sessions["one"].cache is not None
    rest = [e for e in two if e is not PENDING]
    assert rest[-1].finish_reason == "length"


def test_kv_budget_bounds_the_batch(bundle):
    """A row joins only when the padded batch fits: with room for about one
    row at its worst case, two sessions decode one after the other, and give
    what they give alone."""
    node = Node.load(bundle, 0, kv_bits=None)
    p = node.encode("the quick brown fox")
    params = GenParams(max_tokens=40)
    solo = alone(node, "solo", p, params)
    node.sessions.budget = int(padded_bytes([len(p) + 40], node.sessions.per_token) * 1.6)
    node.sessions.close("solo")
    together, widest = drive(node, [("x", p, params, 0), ("y", p, params, 0)])
    assert widest == 1
    same(together["x"], solo)
    same(together["y"], solo)


def test_batch_cache_merge_extract_roundtrip():
    from mlx_lm.models.cache import QuantizedKVCache

    from mlxmoe.node.batch_cache import BatchQuantizedKVCache

    rows = []
    for n in (3, 7, 0):
        c = QuantizedKVCache(group_size=32, bits=8)
        if n:
            c.update_and_fetch(mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64)))
        rows.append(c)
    b = BatchQuantizedKVCache.merge(rows)
    assert b.size() == 7 and b.left_padding.tolist() == [4, 0, 7]
    for i, c in enumerate(rows[:2]):
        e = b.extract(i)
        assert e.offset == c.offset
        for x, y in zip(e.keys + e.values, c.keys + c.values):
            assert mx.array_equal(x, y[..., :c.offset, :])
    b.update_and_fetch(mx.random.normal((3, 2, 1, 64)), mx.random.normal((3, 2, 1, 64)))
    b.filter([0, 2])  # rows 0 and 2 remain: the padding both have is dropped
    assert b.left_padding.tolist() == [0, 3] and b.size() == 4
    other = BatchQuantizedKVCache.merge(rows[1:2])
    b.extend(other)
    assert b.size() == 7 and b.left_padding.tolist() == [3, 6, 0]
    assert mx.array_equal(b.extract(2).keys[0], rows[1].keys[0][..., :7, :])


def test_padded_bytes_is_every_row_at_the_longest():
    assert padded_bytes([], 10.0) == 0
    assert padded_bytes([10, 300], 2.0) == 2 * 512 * 2


def test_masked_node_meters_each_batched_session(bundle):
    """The live quality meter (model/meter.py) is sampled every METER_EVERY
    decode steps for every row and reported per session after its turn; a node
    with every expert eligible has none to report."""
    from mlxmoe.node.batch import METER_EVERY

    node = Node.load(bundle, 0, kv_bits=None)
    p = node.encode("the quick brown fox")
    drive(node, [("m1", p, GenParams(max_tokens=3 * METER_EVERY), 0), ("m2", p[:3], GenParams(max_tokens=2 * METER_EVERY), 0)])
    st = node.info()["session_stats"]
    for sid in ("m1", "m2"):
        assert 0.0 <= st[sid]["quality_meter"] <= 1.0 and st[sid]["quality_meter_turns"] == 1
    full = Node.load(bundle, None, kv_bits=None)
    alone(full, "f", p, GenParams(max_tokens=2 * METER_EVERY))
    assert full.info()["session_stats"]["f"].get("quality_meter") is None


def test_a_failing_row_ends_alone_and_the_batch_goes_on(bundle, monkeypatch):
    """A row's logits processor (a grammar past its limits) fails mid-decode: that row ends with its own
    error, its caches keep the tokens it delivered, and every other row of the batch decodes on unharmed."""
    from mlxmoe.errors import MlxMoeError
    from mlxmoe.node import engine

    real, calls = engine.sampling_processors, []

    def failing(tokens, logits):
        calls.append(1)
        if len(calls) >= 4:
            raise MlxMoeError("grammar: token 27 was not allowed (parser error: Too many items)")
        return logits

    monkeypatch.setattr(engine, "sampling_processors",
                        lambda p, v: real(p, v) + ([failing] if p.frequency_penalty == 0.5 else []))
    node = Node.load(bundle, 0, kv_bits=None)
    a, b = node.encode("the quick brown fox"), node.encode("def add(a, b):")
    expected = alone(node, "good-alone", a, GenParams(max_tokens=12))
    streams = {"good": node.generate("good", a, GenParams(max_tokens=12)),
               "bad": node.generate("bad", b, GenParams(max_tokens=12, frequency_penalty=0.5))}
    got, errors, widest = {"good": [], "bad": []}, {}, 0
    while streams:
        for sid, it in list(streams.items()):
            try:
                ev = next(it)
            except StopIteration:
                del streams[sid]
                continue
            except MlxMoeError as e:
                errors[sid] = e
                del streams[sid]
                continue
            if ev is not PENDING:
                got[sid].append(ev)
        widest = max(widest, len(node.batch.gen) if node.batch.gen is not None else 0)
    assert widest == 2 and list(errors) == ["bad"] and "token 27" in str(errors["bad"])
    same(got["good"], expected)
    s = node.sessions.sessions["bad"]
    assert len(got["bad"]) >= 2 and s.tokens == b + [e.token for e in got["bad"]] and not s.busy
    assert all(c.offset == len(s.tokens) for c in s.cache)


def test_prompt_work_beside_decoding_rows_is_paced(bundle):
    """Beside a decoding row, a step (and a member's paced prefill call) computes only what the
    measured rate fits in the budget: a long prompt never holds the engine for its whole length."""
    node = Node.load(bundle, 0, kv_bits=None)
    node.batch.pace = Pace(2048, 0.05)
    node.batch.pace.rate = 400.0  # tokens/s: 20 tokens per step
    long = node.encode("the quick brown fox jumps over the lazy dog " * 6)
    running = node.generate("running", node.encode("def add(a, b):"), GenParams(max_tokens=40))
    next(running)
    assert node.batch.decoding()
    pieces = []
    while True:
        node.batch.pace.rate = 400.0  # (each step measures anew: keep the test's pace)
        n = node.prefill("member", long, paced=True)
        if not n:
            break
        pieces.append(n)
        next(running)  # the running stream decodes in between
    assert sum(pieces) == len(long) and len(pieces) >= 3 and max(pieces) <= 20
    whole = Node.load(bundle, 0, kv_bits=None)
    whole.prefill("member", long)
    a, b = node.sessions.sessions["member"], whole.sessions.sessions["member"]
    assert a.tokens == b.tokens == long
    for x, y in zip(a.cache, b.cache):
        np.testing.assert_allclose(np.array(x.keys[..., :x.offset, :]), np.array(y.keys[..., :y.offset, :]), atol=1e-5)
    running.close()
