"""A node: one bundle group loaded into an mlx-lm model with masked routing,
sessions with their own (quantized) KV caches, and generation with per-token
log-probabilities, every active generation decoded in one batched step
(node/batch.py). Implements node.contract.Engine for the cluster layer."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from contextlib import nullcontext
from typing import Iterator

import mlx.core as mx
import numpy as np

from mlxmoe import wire
from mlxmoe.errors import ContextOverflow, MlxMoeError, SessionBusy
from mlxmoe.node import grammar
from mlxmoe.node.batch import Batch, Row, prefill_chunk, without
from mlxmoe.node.batch_cache import quantizable, quantize
from mlxmoe.node.contract import PENDING, TokenEvent
from mlxmoe.params import SAMPLING_DEFAULTS, GenParams, check, model_defaults, resolve
from mlxmoe.node.kvstate import export_caches, import_caches
from mlxmoe.node.stream import NullDetokenizer, check_resume, text_events
from mlxmoe.model.load import Loaded, load_bundle, load_generation_config, load_tokenizer
from mlxmoe.model.meter import SessionMeter
from mlxmoe.model.moe import pristine, state_of
from mlxmoe.node.remote.route import Remote, routed_local
from mlxmoe.node.prefixes import Prefixes, shared_length
from mlxmoe.node.sessions import Session, SessionStore
from mlxmoe.node.tokens import Tokens, end_ids, special_ids, turn_start
from mlxmoe.node.trunk import gate_logits

log = logging.getLogger("mlxmoe.node")


class Node(Tokens):
    def __init__(self, loaded: Loaded, tokenizer, *, kv_bits: int | None = 8, kv_group_size: int | None = None,
                 kv_budget_bytes: int | None = None,
                 max_context: int | None = None, bundle_dir: str | None = None):
        self.loaded, self.tokenizer = loaded, tokenizer
        self.model, self.manifest, self.group = loaded.model, loaded.manifest, loaded.group
        self.bundle_dir = bundle_dir
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        cfg = self.manifest.model["config"]
        self.max_context = int(max_context or cfg.get("max_position_embeddings") or 4096)
        self.vocab_size = int(cfg["vocab_size"])
        self.eos = end_ids(tokenizer)  # eos_token_ids of tokenizer, config and generation_config; the turn end
        self.special = (special_ids(tokenizer) - self.eos) if tokenizer else set()  # never sent as text
        self.sampling_defaults = model_defaults(load_generation_config(bundle_dir)) if bundle_dir else dict(SAMPLING_DEFAULTS)
        self._pieces: dict[int, str] = {}
        start = turn_start(tokenizer) if tokenizer else None
        self.banned = [start] if start is not None and start not in self.eos else []  # never sampled in an answer
        per_token = self._kv_bytes_per_token()
        self.kv_note = self._check_quantized_kv()
        if self.kv_note:
            self.kv_bits = None
            per_token = self._kv_bytes_per_token()
        self.kv_note = self.kv_note or self._unquantized_layers()
        if self.kv_note:
            log.warning("KV cache: %s", self.kv_note)
        budget = kv_budget_bytes if kv_budget_bytes is not None else _default_budget()
        self.sessions = SessionStore(budget, per_token)
        self.batch = Batch(self.model, [loaded.blocks[l] for l in self.manifest.moe_layers], self.sessions,
                           per_token, self.kv_bits, self.kv_group_size, self.banned)
        self.prefixes = Prefixes()  # prompt prefixes shared across sessions (node/prefixes.py)
        self.sessions.held = lambda: self.batch.kv_bytes() + self.prefixes.nbytes
        self.sessions.drop_spare = self.prefixes.drop_oldest
        self.meters: dict[str, SessionMeter] = {}  # the live quality meter of each session (model/meter.py)
        if self.group is not None:  # every expert eligible: the meter would read 1.0
            self.batch.metered = loaded
        self.remote = Remote(loaded)  # remote routed experts (routing modes), both directions
        self.inbox = self.remote.inbox  # the node server runs peers' `experts` requests through it
        self.started = time.time()

    @classmethod
    def load(cls, bundle_dir: str, group: int | None, kv_bits: int | None = "manifest",
             kv_budget_bytes: int | None = None, verify: bool = True, tokenizer: bool = True, **kw) -> "Node":
        """tokenizer=False: token ids only (benchmarks of tokenizer-less models)."""
        loaded = load_bundle(bundle_dir, group, verify=verify)
        if kv_bits == "manifest":
            kv_bits = loaded.manifest.quantization.get("kv_bits")
        return cls(loaded, load_tokenizer(bundle_dir) if tokenizer else None, kv_bits=kv_bits,
                   kv_budget_bytes=kv_budget_bytes, bundle_dir=str(bundle_dir), **kw)

    # ------------------------------------------------------------ KV
    def _kv_bytes_per_token(self) -> float:
        """KV bytes per token, measured: one token through a fresh cache.
        Layers mlx-lm cannot quantize (sliding-window RotatingKVCache) count unquantized."""
        cache = self._new_cache()
        self.model(mx.array([[0]]), cache=cache)
        total = 0.0
        for c in cache:
            for t in (getattr(c, "keys", None), getattr(c, "values", None)):
                if not isinstance(t, mx.array):
                    continue
                elems = t.shape[1] * t.shape[-1] if t.ndim == 4 else t.shape[-1]
                if self.kv_group_size is None:  # largest standard group that divides the head size
                    self.kv_group_size = next((g for g in (64, 32) if t.shape[-1] % g == 0), 64)
                if not (self.kv_bits and quantizable(c)):
                    total += elems * t.dtype.size
                    continue
                if t.shape[-1] % self.kv_group_size:
                    raise MlxMoeError(f"--kv-bits {self.kv_bits}: head size {t.shape[-1]} is not a multiple of the KV "
                                      f"quantization group size {self.kv_group_size}; use --kv-bits 16 for this model")
                total += elems * (self.kv_bits / 8 + 2 * t.dtype.size / self.kv_group_size)  # packed + scale + bias
        return total

    def _unquantized_layers(self) -> str | None:
        """Which layers keep an unquantized cache although the node quantizes its KV (said once)."""
        if not self.kv_bits:
            return None
        kinds = [type(c).__name__ for c in self._new_cache() if not quantizable(c)]
        if not kinds:
            return None
        return (f"{len(kinds)} of {len(self.model.layers)} layers keep an unquantized KV cache "
                f"({', '.join(sorted(set(kinds)))}: mlx-lm cannot quantize it, e.g. sliding-window attention)")

    def _check_quantized_kv(self) -> str | None:
        """One decode step on a quantized KV cache: MLX's CUDA backend has no
        quantized matmul for some head sizes (e.g. 64 at 8 bits in MLX 0.32.4),
        mlx-lm's quantized attention has no attention sinks (gpt_oss), and a
        node must not fail at its first token. Returns why the cache stays
        unquantized, or None."""
        if not self.kv_bits:
            return None
        cache = self._new_cache()
        self.model(mx.array([[0] * 9]), cache=cache)
        quantize(cache, self.kv_group_size, self.kv_bits)
        try:
            mx.eval(self.model(mx.array([[0]]), cache=cache))
        except (RuntimeError, ValueError) as e:
            return f"--kv-bits {self.kv_bits} fails for this model here ({str(e)[:160]}); the KV cache is unquantized"
        return None

    def _new_cache(self):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def _reuse(self, s: Session, prompt: list[int], local: bool) -> int:
        """Trim the session's cache to its longest common prefix with `prompt`
        (leaving at least one prompt token to feed), or take a longer one another
        session computed (node/prefixes.py; `local`: this turn borrows no peer's
        experts, nor did the session); return that prefix length."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if s.cache is None:
            s.cache, s.tokens = self._new_cache(), []
        n = min(shared_length(s.tokens, prompt), len(prompt) - 1)
        s.local = s.local and local
        if s.local and (found := self.prefixes.find(prompt, n, self._donors(s))):
            s.cache, s.tokens = found.cache, list(prompt[:found.n])
            return found.n
        if n < len(s.tokens):
            if can_trim_prompt_cache(s.cache):
                trim_prompt_cache(s.cache, len(s.tokens) - n)
            else:
                s.cache, n = self._new_cache(), 0
            s.tokens = s.tokens[:n]
        return n

    def _donors(self, s: Session):
        """(tokens, cache) of the idle sessions whose KV another session may copy."""
        return [(d.tokens, d.cache) for d in self.sessions.sessions.values()
                if d is not s and d.local and not d.busy and d.cache and d.tokens]

    # ------------------------------------------------------------ generation
    def check_prompt(self, prompt, params: GenParams):
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise MlxMoeError("prompt: expected a non-empty list of token ids")
        bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size]
        if bad:
            raise MlxMoeError(f"prompt: token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if len(prompt) >= self.max_context:
            raise ContextOverflow(f"prompt: {len(prompt)} tokens do not fit the context limit of {self.max_context} tokens")
        if params.max_tokens < 1:
            raise MlxMoeError("max_tokens: must be at least 1")

    def generate(self, session_id: str | None, prompt: list[int], params: GenParams) -> Iterator[TokenEvent]:
        """Stream TokenEvents for `prompt` in session `session_id` (reusing its
        cached prefix), decoded in the node's batch. Validation errors are
        raised before the first event. The iterator yields PENDING when another
        stream stepped the batch since this one last looked (node.contract)."""
        self.check_prompt(prompt, params)
        check_resume(prompt, params.resume, params.resume_chars)
        params = resolve(params, self.sampling_defaults)
        processors = sampling_processors(params, self.vocab_size)  # bad values raise here
        constrained = grammar.processor(params.grammar, self.tokenizer, self.vocab_size,  # bad specs raise here
                                        prompt[len(prompt) - params.resume:] if params.resume else ())
        max_tokens = min(params.max_tokens, self.max_context - len(prompt))
        s = self.sessions.get(session_id or uuid.uuid4().hex)
        if s.busy:
            raise SessionBusy(f"session {s.id}: already generating")
        route = self.remote.route(s.id, params)
        n = self._reuse(s, list(prompt), route is None)
        self.sessions.admit(s, len(prompt) - n + max_tokens)
        if params.temperature == 0 and params.top_logprobs == 0:
            sampler, chosen = None, deque()  # the batch's shared greedy sampler fills `chosen`
        else:
            sampler, chosen = _logprob_sampler(stream_sampler(params, self.vocab_size),
                                               min(params.top_logprobs, self.vocab_size), self.banned)
        s.busy = True
        row = self.batch.add(s, list(prompt), n, sampler, chosen, processors + ([constrained] if constrained else []),
                             max_tokens, route, self.meters.setdefault(s.id, SessionMeter()))
        out: list[int] = []
        return RowStream(self.batch, row, self._stream(row, list(prompt), out, chosen, params, max_tokens),
                         lambda: self._end(s, row, list(prompt) + out))

    def prepare(self, params: GenParams) -> None:
        grammar.precompile(params.grammar, self.tokenizer, self.vocab_size)

    def prefill(self, session_id: str, prompt: list[int], paced: bool = False) -> int:
        """Fill `session_id`'s cache with `prompt` without generating (reusing
        any cached prefix); returns the number of tokens actually computed.
        paced: at most a step's worth beside decoding rows (Batch.pace), even
        when none decodes yet (a chat may arrive meanwhile); the caller asks
        again until it returns 0, so other work runs in between."""
        self.check_prompt(prompt, GenParams(max_tokens=1))
        s = self.sessions.get(session_id)
        if s.busy:
            raise SessionBusy(f"session {s.id}: already generating")
        if s.cache is not None and s.tokens == list(prompt):
            return 0
        route = self.remote.last_route(s.id)  # the session's latest routing mode, if remote
        n = self._reuse(s, list(prompt), route is None)
        self.sessions.admit(s, len(prompt) - n)
        pace = self.batch.pace
        end = min(len(prompt), n + pace.tokens(True)) if paced else len(prompt)
        try:
            for i in range(n, end, pace.max_tokens):
                chunk = prompt[i:min(end, i + pace.max_tokens)]
                t0 = time.perf_counter()
                with route.active() if route else nullcontext():
                    prefill_chunk(self.model, chunk, s.cache, self.kv_group_size, self.kv_bits)
                pace.record(len(chunk), time.perf_counter() - t0)
        finally:
            _settle(s, list(prompt[:end]))
            s.last_used = time.time()
        return end - n

    def _stream(self, row: Row, prompt, out: list, chosen, params, max_tokens):
        """The row's TokenEvents (RowStream's `events`); `out` collects its tokens."""
        pairs = (self._step(t, chosen.popleft()) for t in _tokens(row))
        detok = self.tokenizer.detokenizer if self.tokenizer else NullDetokenizer()
        turn = prompt[len(prompt) - params.resume:]  # a continued turn's tokens so far (exact splice)
        open_end = params.open_end and max_tokens == params.max_tokens  # not the context limit: the turn goes on
        for ev in text_events(pairs, detok, self.eos, params.stop, max_tokens, turn, params.resume_chars, open_end,
                              self.special):
            out.append(ev.token)
            ev.piece = self._piece(ev.token)
            yield ev

    def _end(self, s: Session, row: Row, seq: list[int]) -> None:
        """The generation is over (or abandoned): its cache back to the session, trimmed to `seq`."""
        s.cache = self.batch.finish(row)
        if row.meter is not None:
            row.meter.end_turn()
        s.busy = False
        s.turns += 1
        _settle(s, seq)
        s.last_used = time.time()

    def _step(self, token: int, chosen: tuple) -> tuple:
        """(token, logprob, top_logprobs) of one step from what the sampler kept."""
        lp, ids, vals = chosen
        if ids is None:
            return token, lp.item(), None
        return token, lp.item(), [{"token": i, "text": self._piece(i), "logprob": v}
                                  for i, v in zip(ids.tolist(), vals.tolist())]

    def _piece(self, token: int) -> str:
        """One token's own text (top_logprobs alternatives), cached."""
        t = self._pieces.get(token)
        if t is None:
            t = self._pieces[token] = self.tokenizer.decode([token]) if self.tokenizer else ""
        return t

    def score(self, tokens: list[int], layers: list[int] | None = None):
        """Placement scores from this node's own forward pass (exact at the
        first MoE layer; later layers see this node's masked experts)."""
        from mlxmoe.model.placement import score_groups

        return score_groups(self.manifest, gate_logits(self.loaded, tokens, layers))

    def logits(self, tokens: list[int]) -> mx.array:
        """Teacher-forced next-token logits [T, vocab] (no session)."""
        return self.model(mx.array([tokens]))[0]

    # ------------------------------------------------------------ sessions
    def close_session(self, session_id: str) -> bool:
        """Forget the session; its cache is kept for later sessions' prefixes (node/prefixes.py)."""
        self.remote.forget(session_id)
        self.meters.pop(session_id, None)
        s = self.sessions.sessions.get(session_id)
        if s is not None and s.local and not s.busy and s.cache:
            self.prefixes.keep(s.tokens, s.cache)
        closed = self.sessions.close(session_id)
        self.sessions.make_room(0)  # kept prefixes over the budget go first
        return closed

    # ------------------------------------------------------------ remote experts
    def attach_cluster(self, key: bytes) -> None:
        """The cluster key signs this node's calls to peers (set by the node server)."""
        self.remote.key = key

    def experts(self, layer: int, x: dict, ids: list[int] | None = None, rows: list[int] | None = None) -> dict:
        """The `experts` RPC op: routed-expert output of MoE layer `layer` for
        hidden states x ({dtype, shape, data}), routed as this node's own
        masked block routes (shared experts excluded: the caller's trunk).
        With `ids` (routing "split"): expert ids[i] applied to row rows[i]
        (default: row i), unweighted; one output row per id."""
        a = wire.decode_tensor(x)
        with pristine([state_of(b) for b in self.loaded.blocks.values()]):  # this node's own step may be waiting
            if ids is None:
                y = routed_local(self.loaded.blocks[layer], a.reshape(1, -1, a.shape[-1])).reshape(a.shape)
            else:
                y = self._chosen_experts(layer, a.reshape(-1, a.shape[-1]), ids, rows)
            mx.eval(y)
        return wire.encode_tensor(y)

    def _chosen_experts(self, layer: int, x: mx.array, ids: list[int], rows: list[int] | None) -> mx.array:
        if rows is None and len(ids) != x.shape[0]:
            raise MlxMoeError(f"ids: {len(ids)} expert ids for {x.shape[0]} rows of x")
        if rows is not None:
            if len(rows) != len(ids) or not all(0 <= r < x.shape[0] for r in rows):
                raise MlxMoeError(f"rows: need one row of x (0..{x.shape[0] - 1}) per expert id")
            x = x[mx.array(rows)]
        table = self.remote.rows[layer]  # global id -> local row, -1: not held
        missing = sorted({e for e in ids if not 0 <= e < len(table) or table[e] < 0})
        if missing:
            raise MlxMoeError(f"ids: expert(s) {missing[:8]} of layer {layer} are not on this node (group {self.group})")
        sw = getattr(self.loaded.blocks[layer], self.loaded.arch.experts)
        rows = ids if state_of(sw).g2l is not None else table[ids].tolist()  # g2l maps global ids itself
        return sw(x, mx.array(rows, dtype=mx.int32)[:, None])[:, 0]

    def export_session(self, session_id: str) -> dict:
        s = self.sessions.sessions.get(session_id)
        if s is None:
            raise KeyError(session_id)  # the node server answers 404 unknown_session
        if s.busy:  # its cache is ahead of its tokens until the stream ends
            raise SessionBusy(f"session {session_id}: still generating; export it after the stream ends")
        return {"id": s.id, "tokens": list(s.tokens), "caches": export_caches(s.cache), "manifest": self.manifest.hash}

    def adopt(self, manifest: dict) -> str:
        """Serve `manifest` from now on: the same model, in which this node's group holds exactly
        what it holds (its files byte for byte): another Mac joined the cluster (`mlxmoe up`), so
        the groups, their files and the hash changed around it. The bundle's distribution.json is
        replaced too (a restart serves the same). Returns the new hash; MlxMoeError naming what
        differs, and then nothing changes."""
        from mlxmoe.bundle.copy import node_files
        from mlxmoe.bundle.manifest import FILENAME, Manifest

        if not isinstance(manifest, dict):
            raise MlxMoeError("manifest: expected an object")
        new, old, g = Manifest.from_dict(manifest, "manifest"), self.manifest, self.group
        if (new.model, new.moe, new.quantization) != (old.model, old.moe, old.quantization):
            raise MlxMoeError(f"manifest: another model or quantization than this node's ({old.model_id})")
        if g is None or g >= new.n_groups:
            raise MlxMoeError(f"manifest: has no group {g} (this node's)")
        mine = node_files(old, [g])  # trunk, group, overlay, healing, tokenizer: all this node loaded
        if node_files(new, [g]) != mine or any(new.files[f].get("sha256") != old.files[f].get("sha256") for f in mine):
            raise MlxMoeError(f"manifest: the files of group {g} differ from this node's: a new part, not a new plan")
        if any(new.eligible(g, l) != old.eligible(g, l) for l in old.moe_layers):
            raise MlxMoeError(f"manifest: group {g} holds other experts there than here")
        if self.bundle_dir:
            tmp = os.path.join(self.bundle_dir, f".{FILENAME}.adopt")
            with open(tmp, "w") as f:
                json.dump(new.to_dict(), f, indent=1)
            os.replace(tmp, os.path.join(self.bundle_dir, FILENAME))
        self.manifest = self.loaded.manifest = self.remote.m = new
        self.remote.links.clear()  # they named the old hash
        return new.hash

    def import_session(self, state: dict) -> str:
        if state.get("manifest") != self.manifest.hash:
            raise MlxMoeError(f"session {state.get('id')}: exported from manifest {state.get('manifest')}, this node serves {self.manifest.hash}")
        s = self.sessions.get(state["id"])
        s.tokens = list(state["tokens"])
        s.cache = import_caches(state["caches"])
        s.local = False  # computed with another node's experts: no prefix for this node's sessions
        return s.id

    # ------------------------------------------------------------ status
    def info(self) -> dict:
        m = self.manifest
        return {
            "model": m.model_id, "manifest_hash": m.hash, "group": self.group, "n_groups": m.n_groups,
            "eligible": {str(l): len(ids) for l, ids in self.loaded.local_ids.items()},
            "memory": {**self.loaded.bytes, "kv_used": self.sessions.used(), "kv_budget": self.sessions.budget},
            "free_kv": self.sessions.budget - self.sessions.used(),
            "sessions": len(self.sessions.sessions),
            "active_sessions": sum(s.busy for s in self.sessions.sessions.values()),
            "context_limit": self.max_context, "kv_bits": self.kv_bits, "kv_note": self.kv_note,
            "session_stats": {sid: {**st, **(self.meters[sid].stats() if sid in self.meters else {})}
                              for sid, st in self.remote.stats.items() if sid in self.sessions.sessions},
            "experts_op": {"layers": list(m.moe_layers), "hidden": int(m.model["config"]["hidden_size"])},
            "experts_served": self.inbox.served, "batch": self.batch.info(),
            "prefixes": {"kept": len(self.prefixes.kept), "bytes": self.prefixes.nbytes, "hits": self.prefixes.hits,
                         "tokens_reused": self.prefixes.tokens},
            "backend": backend_name(), "moe_path": self.loaded.moe_path, "fused_layers": self.loaded.fused_layers,
            "uptime_s": time.time() - self.started,
        }


class RowStream:
    """The iterator generate() returns: one generation's TokenEvents. Each
    step of the batch is taken by whichever stream needs a token first in a
    round; `end` runs once, when the events end, fail or are closed."""

    def __init__(self, batch: Batch, row: Row, events: Iterator[TokenEvent], end):
        self.batch, self.row, self.events, self._end = batch, row, events, end

    def __iter__(self):
        return self

    def __next__(self):
        if self._end is None:
            raise StopIteration
        try:
            if not self.batch.ready(self.row):
                return PENDING
            return next(self.events)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        end, self._end = self._end, None
        if end is not None:
            self.events.close()
            end()

    def __del__(self):
        self.close()


def _tokens(row: Row) -> Iterator[int]:
    """The row's tokens as the batch makes them (RowStream asks only when one
    is there or the row is over), then its error if it failed."""
    while row.out:
        yield row.out.popleft()
    if row.error is not None:
        raise row.error


def _settle(s: Session, seq: list[int]):
    """Make every layer's cache hold exactly the KV of s.tokens. A step that
    failed midway (a peer lost at layer l) advanced only the layers before l:
    keep the tokens all layers hold, trim the rest (or drop the cache if it
    cannot be trimmed: the transcript re-prefills, nothing is lost)."""
    if not s.cache:
        s.tokens = []
        return
    s.tokens = seq[:min(c.offset for c in s.cache)]
    n = len(s.tokens)  # a failed step may have left KV of a token never yielded
    if any(c.offset != n for c in s.cache):
        if all(c.is_trimmable() for c in s.cache):
            for c in s.cache:
                c.trim(c.offset - n)
        else:
            s.cache, s.tokens = None, []


def _logprob_sampler(sample, n_top: int = 0, banned: list[int] = ()):
    """Wrap a sampler so the chosen token's log-probability (and the n_top most
    likely tokens, best first) is computed in the same step as the token.
    Reading it later costs nothing; indexing the logprobs vector after the
    fact would queue a new op behind the next step and stall mlx-lm's
    pipelined decode loop (measured: 0.64x on CUDA). The log-probabilities
    are those of the distribution the token is drawn from: after logit_bias,
    penalties and grammar (as mlx-lm reports them), without the `banned`
    tokens (renormalised), before temperature and top-p/top-k/min-p."""
    chosen = deque()

    def sampler(logprobs):
        logprobs = without(logprobs, banned)
        y = sample(logprobs)
        lp = mx.take_along_axis(logprobs, y[..., None], axis=-1).squeeze().astype(mx.float32)
        ids = vals = None
        if n_top > 0:
            flat = logprobs.reshape(-1)
            ids = mx.argpartition(-flat, kth=n_top - 1)[:n_top]
            order = mx.argsort(-flat[ids])
            ids = ids[order]
            vals = flat[ids].astype(mx.float32)
            mx.async_eval(lp, ids, vals)
        else:
            mx.async_eval(lp)
        chosen.append((lp, ids, vals))
        return y

    return sampler, chosen


def stream_sampler(p: GenParams, vocab: int):
    """mlx-lm's sampler chain (top-p, min-p, top-k, then a categorical draw:
    mlx_lm.sample_utils.make_sampler) with this stream's own random key, so a
    seed gives the same tokens however many streams the engine thread
    interleaves (make_sampler draws from MLX's one global RNG state)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if p.temperature == 0:
        return greedy_sampler
    filters = []
    if 0 < p.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, p.top_p))
    if p.min_p:
        filters.append(lambda x: apply_min_p(x, p.min_p))
    if 0 < p.top_k < vocab:
        filters.append(lambda x: apply_top_k(x, p.top_k))
    seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
    key = [mx.random.key(seed)]

    def sample(logprobs):
        for f in filters:
            logprobs = f(logprobs)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1.0 / p.temperature), key=sub)

    return sample


PENALTY_CONTEXT = 20  # tokens each penalty looks back on (mlx-lm's default)


def sampling_processors(p: GenParams, vocab: int) -> list:
    """mlx-lm's logits processors for logit_bias and the three penalties
    (mlx_lm.sample_utils.make_logits_processors). MlxMoeError names a bad field."""
    from mlx_lm.sample_utils import make_logits_processors

    check_sampling(p, vocab)
    bias = {int(k): float(v) for k, v in p.logit_bias.items()}
    return make_logits_processors(bias or None, p.repetition_penalty if p.repetition_penalty != 1.0 else None,
                                  PENALTY_CONTEXT, p.presence_penalty or None, PENALTY_CONTEXT,
                                  p.frequency_penalty or None, PENALTY_CONTEXT)


def check_sampling(p: GenParams, vocab: int) -> None:
    """Sampling fields after resolve(): the ranges of mlxmoe/params.py, and logit_bias ids in the vocabulary."""
    check(p.to_dict())
    for k in p.logit_bias:
        if int(k) >= vocab:
            raise MlxMoeError(f"logit_bias: token id {str(k)[:20]!r} is outside the vocabulary (0..{vocab - 1})")


def backend_name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def _default_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.25)
