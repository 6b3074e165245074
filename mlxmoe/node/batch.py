"""Continuous batching: every active generation of a node decodes in one
batched forward per step (docs/ARCHITECTURE.md, "Batching").

A generation is a `Row`. New rows prefill their prompt alone (one row per
forward, so a session's own route and plain caches apply), in chunks. With no
row decoding a step takes chunks of up to PREFILL_TOKENS (mlx-lm's prefill
step: a lone prompt prefills as fast as mlx-lm's); beside decoding rows, only as
many prompt tokens as the measured prefill rate fits in PREFILL_BUDGET_S, so a
long prompt delays the running streams by about that much per step, never by its
whole length (`Pace`). With quantized KV the first chunk's size changes its
numbers (it attends unquantized, as in mlx-lm): a prompt prefilled beside
running streams may differ in the last bits from the same prompt alone.
When only the prompt's last token is left, the row joins the decoding batch:
mlx-lm's GenerationBatch (its pipelined step, per-row samplers and logits
processors), with the rows' caches merged into batch caches (node/batch_cache.py).
A row leaves the batch when its stream ends; its cache goes back to its session.

One row decodes on its own plain caches, as a node without batching would: the
fused one-token path (model/fused_layer.py) applies; two or more take mlx-lm's
batched path, where the fused steps fall back by themselves (they take one token).

Rows with a remote route (node/remote/route.py) share the step: at each MoE
layer the batch's hidden states are split by route, rows of routes to the same
peers computed together (one call per peer per layer step), local rows by the
block's own code. A peer that fails ends only its rows (PeerError); the others go on.

The KV budget bounds the batch: a row joins only when the batch's worst case
(every row left-padded to the longest row, each at its full max_tokens: what
the batch caches allocate) fits beside the other sessions' caches.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import mlx.core as mx

from mlxmoe.errors import PeerError
from mlxmoe.model import meter
from mlxmoe.model.moe import hooked, unhooked
from mlxmoe.node.batch_cache import is_batched, merge, quantize

PREFILL_TOKENS = 2048  # the largest prompt chunk a step computes (mlx-lm's prefill step size)
PREFILL_BUDGET_S = 0.25  # beside decoding rows, a step's prompt chunks take about this long
PREFILL_MIN = 16  # ... and hold at least this many tokens (a long prompt always progresses)
METER_EVERY = 8  # decode steps per quality-meter sample (it costs the fused layer step and a router matmul)
NO_LIMIT = 1 << 40  # GenerationBatch's own max_tokens: rows end here (Row.max_tokens), not there
STEP = 256  # KV caches grow in blocks of this many tokens


@dataclass(eq=False)
class Row:
    uid: int
    session: object  # node.sessions.Session
    todo: list  # prompt tokens still to prefill (the last one is fed by the first decode step)
    last: int
    context: list  # tokens in the row's cache (logits processors see them and what follows)
    sampler: object  # Batch.greedy, or the row's own sampler (node/engine.py)
    chosen: deque  # per token: (log-probability, top ids, top log-probabilities), in the order sampled
    processors: list
    max_tokens: int
    route: object = None  # node.remote.route.Route, or None: local
    meter: object = None  # model.meter.SessionMeter of its session (a masked node's live quality meter)
    cache: list | None = None  # its own caches (prefill); None while in the batch
    out: deque = field(default_factory=deque)  # tokens produced, not yet taken by its stream
    produced: int = 0
    state: str = "prefill"  # prefill -> decode -> done
    error: BaseException | None = None
    seen: int = 0  # Batch.steps when its stream last looked

    @property
    def final_length(self) -> int:
        """Tokens its cache holds at most (worst case: every max_token generated)."""
        return len(self.context) + 1 + self.max_tokens


def prefill_chunk(model, tokens: list[int], cache: list, kv_group_size: int, kv_bits: int | None) -> None:
    """One prompt chunk into a session's own caches, then quantized as the node keeps its KV and
    evaluated (the batch's prefill and Node.prefill). As mlx-lm's generate_step does, the first
    chunk attends to its own KV unquantized; later chunks see quantized KV, whatever their size."""
    model(mx.array([tokens]), cache=cache)
    quantize(cache, kv_group_size, kv_bits)
    mx.eval([c.state for c in cache])


class Pace:
    """Prompt tokens per step: `max_tokens` while no row decodes; beside decoding
    rows as many as the measured rate (smoothed) fits in `budget_s`, at least
    PREFILL_MIN (budget_s None: always max_tokens)."""

    def __init__(self, max_tokens: int = PREFILL_TOKENS, budget_s: float | None = PREFILL_BUDGET_S):
        self.max_tokens, self.budget_s = max_tokens, budget_s
        self.rate: float | None = None  # prompt tokens per second

    def tokens(self, decoding: bool) -> int:
        if not decoding or self.budget_s is None:
            return self.max_tokens
        if self.rate is None:
            return min(PREFILL_MIN, self.max_tokens)
        return max(PREFILL_MIN, min(self.max_tokens, int(self.rate * self.budget_s)))

    def record(self, n: int, seconds: float) -> None:
        r = n / max(seconds, 1e-6)
        self.rate = r if self.rate is None else 0.7 * self.rate + 0.3 * r


def guarded(row: Row, fn, keep: int | None = None, fallback=None):
    """`fn` (a row's logits processor or sampler) as one that cannot fail the
    batch: its error becomes the row's (the step then ends that row alone),
    and it returns its argument `keep` (the logits, unchanged) or fallback(*args)."""
    def call(*args):
        if row.error is None:
            try:
                return fn(*args)
            except Exception as e:  # a grammar past its limits, a sampler's bad value: this row's failure
                row.error = e
        return args[keep] if keep is not None else fallback(*args)
    return call


def padded_bytes(lengths: list[int], per_token: float) -> int:
    """Bytes of batch caches holding rows of these lengths: every row padded to
    the longest, in STEP blocks (BatchKVCache's allocation)."""
    if not lengths:
        return 0
    return int(len(lengths) * -(-max(lengths) // STEP) * STEP * per_token)


def without(logprobs: mx.array, ids) -> mx.array:
    """Log-probabilities with `ids` never drawn (the template's turn start), renormalised."""
    if ids is None or not len(ids):
        return logprobs
    out = logprobs.at[..., mx.array(ids) if isinstance(ids, list) else ids].add(-mx.inf)
    return out - mx.logsumexp(out, axis=-1, keepdims=True)


class Greedy:
    """The sampler of every plain-greedy row (temperature 0, no top_logprobs).
    GenerationBatch calls one shared sampler once for the whole batch (when
    every row has it; otherwise once per row, in row order). The chosen
    tokens' log-probabilities are computed in the same step (reading them
    later would queue work behind the next step); `calls` keeps them until
    the batch hands them to the rows."""

    def __init__(self, banned: list[int]):
        self.ban = mx.array(banned) if banned else None  # the turn start: never sampled
        self.calls: list = []

    def __call__(self, logprobs):
        logprobs = without(logprobs, self.ban)  # the distribution the token is drawn from
        y = mx.argmax(logprobs, axis=-1)
        lp = mx.take_along_axis(logprobs, y[:, None], axis=-1)[:, 0].astype(mx.float32)
        mx.async_eval(lp)
        self.calls.append(lp)
        return y


class LogProb:
    """Row i's entry of one Greedy call, read once the step is evaluated (no new work)."""

    def __init__(self, lps: mx.array, i: int, cache: dict):
        self.lps, self.i, self.cache = lps, i, cache

    def item(self) -> float:
        key = id(self.lps)
        if key not in self.cache:
            self.cache.clear()
            self.cache[key] = self.lps.tolist()
        return self.cache[key][self.i]


class Batch:
    def __init__(self, model, blocks: list, sessions, per_token: float, kv_bits: int | None,
                 kv_group_size: int, banned: list[int] = ()):
        self.model, self.blocks, self.sessions = model, blocks, sessions
        self.metered = None  # the Loaded model to meter (a node whose experts are masked), set by the node
        self._meter_pending = None  # (rows, shares [B]) of the last metered step, read one step later
        self.greedy = Greedy(list(banned))
        self._lists: dict = {}
        self.per_token, self.kv_bits, self.kv_group_size = per_token, kv_bits, kv_group_size
        self.pace = Pace()
        self.rows: dict[int, Row] = {}
        self.gen = None  # mlx-lm GenerationBatch of the decoding rows
        self.steps = 0
        self._uids = 0

    # ------------------------------------------------------------ rows
    def add(self, session, prompt: list[int], cached: int, sampler, chosen, processors, max_tokens, route,
            session_meter=None) -> Row:
        """A generation of `prompt` whose first `cached` tokens are in session.cache;
        sampler None: plain greedy (Batch.greedy, which fills `chosen`)."""
        self._uids += 1
        row = Row(self._uids, session, list(prompt[cached:-1]), prompt[-1], list(prompt[:-1]), sampler or self.greedy,
                  chosen, processors, max_tokens, route, session_meter, cache=session.cache, seen=self.steps)
        row.processors = [guarded(row, p, keep=-1) for p in processors]
        if sampler is not None:
            row.sampler = guarded(row, sampler, fallback=lambda lp: mx.argmax(lp, axis=-1))
        session.cache = None  # the row holds it now (and gives it back at the end)
        self.rows[row.uid] = row
        return row

    def finish(self, row: Row) -> list | None:
        """Take `row` out (its stream ended); returns its own caches (None if lost)."""
        self._read_meter()
        if row.state == "decode":
            row.cache = self._take(self.gen.uids.index(row.uid))
        row.state = "done"
        self.rows.pop(row.uid, None)
        cache, row.cache = row.cache, None
        return cache

    def kv_bytes(self) -> int:
        """KV bytes the batch holds (decoding rows, and prefilling rows' own caches)."""
        return self._gen_bytes() + sum(c.nbytes for r in self.rows.values() if r.cache for c in r.cache if not c.empty())

    def _gen_bytes(self) -> int:
        return sum(c.nbytes for c in self.gen.prompt_cache if not c.empty()) if self.gen is not None else 0

    def decoding(self) -> bool:
        """Some rows decode: prompt work is paced beside them."""
        return self.gen is not None and len(self.gen) > 0

    def info(self) -> dict:
        """Plain numbers for the node's info(): rows decoding and prefilling, steps taken."""
        states = [r.state for r in self.rows.values()]
        return {"decoding": states.count("decode"), "prefilling": states.count("prefill"), "steps": self.steps}

    def ready(self, row: Row) -> bool:
        """Step the batch until `row` has a token (or ended), unless another
        stream stepped it since `row` last looked: then False (its turn is next
        round, so one round of streams costs one step)."""
        while not (row.out or row.state in ("ended", "done")):
            if row.seen != self.steps:
                row.seen = self.steps
                return False
            self.step()
            row.seen = self.steps
        return True

    # ------------------------------------------------------------ one step
    def step(self) -> None:
        self.steps += 1
        if self.gen is not None and len(self.gen):
            self._decode()
        self._prefill()

    def _decode(self) -> None:
        rows = [self.rows[u] for u in self.gen.uids]
        self._read_meter()
        # a remote route computes parts of the batch apart (its gates see sub-batches) and masks per token
        # otherwise: the meter, of the node's own eligible set, samples steps of local rows only
        sample = self.metered is not None and self.steps % METER_EVERY == 0 and all(r.route is None for r in rows)
        if sample:
            meter.start(self.metered)
        try:
            with self._routes(rows):
                responses = self.gen.next()
        except Exception as e:  # the engine itself failed: every row of the step ends with it
            if sample:
                meter.stop(self.metered)
            self._fail(rows, e, drop_cache=True)
            self.gen, self.greedy.calls = None, []
            return
        if sample:
            self._meter_pending = (rows, meter.take_rows(self.metered, len(rows)))
            meter.stop(self.metered)
        self._hand_out(rows)
        for r, resp in zip(rows, responses):
            if r.error is None:
                r.out.append(resp.token)
                r.produced += 1
        self._fail([r for r in rows if r.error is not None], None)
        for r in rows:
            if r.state == "decode" and r.produced >= r.max_tokens:
                r.cache = self._take(self.gen.uids.index(r.uid))
                r.state = "ended"  # its stream takes the last tokens, then finish()

    def _prefill(self) -> None:
        chunk = budget = self.pace.tokens(self.decoding())
        joining = []
        for r in [r for r in self.rows.values() if r.state == "prefill"]:
            if r.cache is None:
                r.cache = self._new_cache()
            while r.todo and budget > 0:
                n = min(len(r.todo), chunk)  # not cut to the budget left: a row's chunks do not depend on others
                try:
                    t0 = time.perf_counter()
                    with self._routes([r]):
                        prefill_chunk(self.model, r.todo[:n], r.cache, self.kv_group_size, self.kv_bits)
                    self.pace.record(n, time.perf_counter() - t0)
                except Exception as e:
                    return self._fail([r], e, drop_cache=True)
                if r.error is not None:  # its peer was lost: the chunk's KV (computed with zeros) is trimmed
                    return self._fail([r], None, trim=n)
                del r.todo[:n]
                budget -= n
            if not r.todo and self._fits(joining + [r]):
                joining.append(r)
            if budget <= 0:
                break
        if joining:
            self._join(joining)

    def _join(self, rows: list[Row]) -> None:
        """Start decoding `rows`: their first step (the prompt's last token) in
        a batch of their own, then that batch appended to the running one."""
        from mlx_lm.generate import GenerationBatch, StopSequences, greedy_sampler

        for r in rows:
            r.cache = self._own(r.cache)
        caches = rows[0].cache if len(rows) == 1 else [merge(list(cs)) for cs in zip(*(r.cache for r in rows))]
        try:
            with self._routes(rows):
                new = GenerationBatch(self.model, [r.uid for r in rows], mx.array([r.last for r in rows]), caches,
                                      [list(r.context) for r in rows], [r.sampler for r in rows], greedy_sampler,
                                      [r.processors for r in rows], [StopSequences() for _ in rows],
                                      [NO_LIMIT] * len(rows))
        except Exception as e:
            self.greedy.calls = []
            return self._fail(rows, e, drop_cache=True)
        self._hand_out(rows)
        for r in rows:
            r.state, r.cache = "decode", None
        if self.gen is None or not len(self.gen):
            self.gen = new
        else:
            for b in (self.gen, new):
                if not is_batched(b.prompt_cache[0]):
                    b.prompt_cache = [merge([c]) for c in b.prompt_cache]
            self.gen.extend(new)
        self._fail([r for r in rows if r.error is not None], None)

    def _read_meter(self) -> None:
        """The last metered step's shares, per row (evaluated by now: reading adds no wait)."""
        if self._meter_pending is None:
            return
        rows, shares = self._meter_pending
        self._meter_pending = None
        for r, v in zip(rows, shares.tolist() if shares is not None else []):
            if r.meter is not None and r.error is None:
                r.meter.add(v)

    def _hand_out(self, rows: list[Row]) -> None:
        """Give each greedy row of the step just taken its log-probability."""
        calls, self.greedy.calls = self.greedy.calls, []
        mine = [r for r in rows if r.sampler is self.greedy]
        if len(calls) == 1 and len(mine) == len(rows):  # one call for the whole batch
            for i, r in enumerate(mine):
                r.chosen.append((LogProb(calls[0], i, self._lists), None, None))
        else:  # one call per greedy row, in row order
            for r, lps in zip(mine, calls):
                r.chosen.append((LogProb(lps, 0, self._lists), None, None))

    def _fits(self, joining: list[Row]) -> bool:
        """The batch with `joining` added fits the KV budget at its worst case
        (idle sessions are evicted for it, LRU first)."""
        rows = [r for r in self.rows.values() if r.state == "decode"] + joining
        need = padded_bytes([r.final_length for r in rows], self.per_token)
        held = self._gen_bytes() + sum(c.nbytes for r in joining for c in r.cache if not c.empty())
        return self.sessions.make_room(need - held)

    # ------------------------------------------------------------ caches
    def _take(self, i: int) -> list:
        """Row i's own caches out of the decoding batch (the batch goes on without it)."""
        g = self.gen
        caches = list(g.prompt_cache) if not is_batched(g.prompt_cache[0]) else [c.extract(i) for c in g.prompt_cache]
        g.filter([j for j in range(len(g.uids)) if j != i])
        if len(g.uids) == 1 and is_batched(g.prompt_cache[0]):
            g.prompt_cache = [c.extract(0) for c in g.prompt_cache]  # alone again: plain caches, the fused path
        return caches

    def _new_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def _own(self, cache: list) -> list:
        """Caches every decoding row shares the kind of: quantized when the node's KV is."""
        return quantize(list(cache), self.kv_group_size, self.kv_bits)

    # ------------------------------------------------------------ failures
    def _fail(self, rows: list[Row], err: BaseException | None, drop_cache: bool = False, trim: int = 0) -> None:
        """End `rows` with `err` (or each row's own error). Their caches keep
        the tokens before the failed step (its KV trimmed: `trim` prompt tokens,
        or the one token of a decode step), or are dropped (drop_cache: the step
        failed midway; the session re-prefills its transcript, nothing is lost)."""
        for r in rows:
            r.error = r.error or err
            n = trim
            if r.state == "decode":
                r.cache, n = (None if drop_cache else self._take(self.gen.uids.index(r.uid))), 1
            if r.cache is not None and (drop_cache or not all(c.is_trimmable() for c in r.cache)):
                r.cache = None
            for c in (r.cache or []) if n else []:
                c.trim(n)
            r.state = "done"
            self.rows.pop(r.uid, None)

    # ------------------------------------------------------------ remote routes
    def _routes(self, rows: list[Row]):
        """Within the block, each MoE layer computes `rows` (the forward's
        batch, in order) by their routes: rows of one route signature
        together, local rows by the block's own code."""
        if all(r.route is None for r in rows):
            return nullcontext()
        groups: dict = {}
        for i, r in enumerate(rows):
            groups.setdefault(_signature(r.route), []).append(i)
        parts = [(idx, [rows[i] for i in idx]) for idx in groups.values()]
        return hooked(self.blocks, [self._hook(layer, parts, len(rows)) for layer in range(len(self.blocks))])

    def _hook(self, layer: int, parts: list, n: int):
        def hook(block, x):
            if len(parts) == 1:
                return _run(parts[0][1], layer, block, x)
            ys = [_run(members, layer, block, x[mx.array(idx)]) for idx, members in parts]
            order = sorted(range(n), key=[i for idx, _ in parts for i in idx].__getitem__)
            return mx.concatenate(ys)[mx.array(order)]
        return hook


def _signature(route) -> tuple | None:
    if route is None:
        return None
    return route.mode, tuple(sorted((g, id(link)) for g, link in route.links.items()))  # links are one per URL (Remote.link)


STAT_KEYS = ("remote_calls", "remote_bytes", "remote_s", "local_steps")


def _run(members: list[Row], layer: int, block, x):
    """One MoE layer's output for the rows of one route signature."""
    route = members[0].route
    if route is None:
        return unhooked(block, x)
    if any(m.error is not None for m in members):
        return mx.zeros_like(x)  # these rows end after this step; do not call the lost peer again
    before = [route.stats[k] for k in STAT_KEYS]
    try:
        y = route.hooks[layer](block, x)
    except PeerError as e:
        for m in members:
            m.error = e
        return mx.zeros_like(x)
    for m in members[1:]:  # every session counts the calls its tokens were in
        for k, b in zip(STAT_KEYS, before):
            m.route.stats[k] += route.stats[k] - b
    return y
