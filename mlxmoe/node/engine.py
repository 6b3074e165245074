"""A node: one bundle group loaded into an mlx-lm model with masked routing,
sessions with their own (quantized) KV caches, and generation with per-token
log-probabilities. Implements node.contract.Engine for the cluster layer."""

from __future__ import annotations

import time
import uuid
from contextlib import nullcontext
from typing import Iterator

import mlx.core as mx
import numpy as np

from mlxmoe import wire
from mlxmoe.errors import ContextOverflow, MlxMoeError, SessionBusy
from mlxmoe.node import grammar
from mlxmoe.node.contract import GenParams, TokenEvent
from mlxmoe.node.kvstate import export_caches, import_caches
from mlxmoe.node.stream import NullDetokenizer, check_resume, text_events
from mlxmoe.model.load import Loaded, load_bundle, load_tokenizer
from mlxmoe.model.moe import state_of
from mlxmoe.node.remote.route import Remote, routed_local
from mlxmoe.node.sessions import Session, SessionStore
from mlxmoe.node.tokens import Tokens
from mlxmoe.node.trunk import gate_logits

DEFAULT_KV_START = 0  # quantize the KV cache from the first token


class Node(Tokens):
    def __init__(self, loaded: Loaded, tokenizer, *, kv_bits: int | None = 8, kv_group_size: int | None = None,
                 kv_start: int = DEFAULT_KV_START, kv_budget_bytes: int | None = None,
                 max_context: int | None = None, bundle_dir: str | None = None):
        self.loaded, self.tokenizer = loaded, tokenizer
        self.model, self.manifest, self.group = loaded.model, loaded.manifest, loaded.group
        self.bundle_dir = bundle_dir
        self.kv_bits, self.kv_group_size, self.kv_start = kv_bits, kv_group_size, kv_start
        cfg = self.manifest.model["config"]
        self.max_context = int(max_context or cfg.get("max_position_embeddings") or 4096)
        self.vocab_size = int(cfg["vocab_size"])
        self.eos = set(tokenizer.eos_token_ids) if tokenizer else set()
        per_token = self._kv_bytes_per_token()
        self.kv_note = self._check_quantized_kv()
        if self.kv_note:
            self.kv_bits = None
            per_token = self._kv_bytes_per_token()
        budget = kv_budget_bytes if kv_budget_bytes is not None else _default_budget()
        self.sessions = SessionStore(budget, per_token)
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
        """KV bytes per token, measured: one token through a fresh cache."""
        cache = self._new_cache()
        self.model(mx.array([[0]]), cache=cache)
        elems, itemsize = 0, 2
        for c in cache:
            for t in (getattr(c, "keys", None), getattr(c, "values", None)):
                if not isinstance(t, mx.array):
                    continue
                elems += t.shape[1] * t.shape[-1] if t.ndim == 4 else t.shape[-1]
                itemsize = t.dtype.size
                if self.kv_group_size is None:  # largest standard group that divides the head size
                    self.kv_group_size = next((g for g in (64, 32) if t.shape[-1] % g == 0), 64)
                if self.kv_bits and t.shape[-1] % self.kv_group_size:
                    raise MlxMoeError(f"--kv-bits {self.kv_bits}: head size {t.shape[-1]} is not a multiple of the KV "
                                      f"quantization group size {self.kv_group_size}; use --kv-bits 16 for this model")
        if self.kv_bits:  # packed values + a scale and a bias per group
            return elems * (self.kv_bits / 8 + 2 * itemsize / self.kv_group_size)
        return elems * itemsize

    def _check_quantized_kv(self) -> str | None:
        """One decode step on a quantized KV cache: MLX's CUDA backend has no
        quantized matmul for some head sizes (e.g. 64 at 8 bits in MLX 0.32.4),
        and a node must not fail at its first token. Returns why the cache
        stays unquantized, or None."""
        if not self.kv_bits or mx.default_device() == mx.cpu:
            return None
        from mlx_lm.generate import maybe_quantize_kv_cache

        cache = self._new_cache()
        self.model(mx.array([[0] * 9]), cache=cache)
        maybe_quantize_kv_cache(cache, 0, self.kv_group_size, self.kv_bits)
        try:
            mx.eval(self.model(mx.array([[0]]), cache=cache))
        except (RuntimeError, ValueError) as e:
            return f"--kv-bits {self.kv_bits} fails on this backend ({str(e)[:160]}); the KV cache is unquantized"
        return None

    def _new_cache(self):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def _reuse(self, s: Session, prompt: list[int]) -> int:
        """Trim the session's cache to its longest common prefix with `prompt`
        (leaving at least one prompt token to feed); return that prefix length."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if s.cache is None:
            s.cache, s.tokens = self._new_cache(), []
        n = 0
        for a, b in zip(s.tokens, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        if n < len(s.tokens):
            if can_trim_prompt_cache(s.cache):
                trim_prompt_cache(s.cache, len(s.tokens) - n)
            else:
                s.cache, n = self._new_cache(), 0
            s.tokens = s.tokens[:n]
        return n

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
        cached prefix). Validation errors are raised before the first event."""
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        self.check_prompt(prompt, params)
        check_resume(prompt, params.resume, params.resume_chars)
        constrained = grammar.processor(params.grammar, self.tokenizer, self.vocab_size,  # bad specs raise here
                                        prompt[len(prompt) - params.resume:] if params.resume else ())
        max_tokens = min(params.max_tokens, self.max_context - len(prompt))
        s = self.sessions.get(session_id or uuid.uuid4().hex)
        if s.busy:
            raise SessionBusy(f"session {s.id}: already generating")
        route = self.remote.route(s.id, params)
        n = self._reuse(s, list(prompt))
        self.sessions.admit(s, len(prompt) - n + max_tokens)
        if params.seed is not None:
            mx.random.seed(params.seed)
        sampler, chosen = _logprob_sampler(make_sampler(temp=params.temperature, top_p=params.top_p))
        steps = generate_step(mx.array(prompt[n:]), self.model, max_tokens=max_tokens, sampler=sampler,
                              logits_processors=[constrained] if constrained else None,
                              prompt_cache=s.cache, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size,
                              quantized_kv_start=self.kv_start)
        if route is not None:
            steps = route.wrap(steps)
        return self._stream(s, list(prompt), steps, chosen, params, max_tokens)

    def prefill(self, session_id: str, prompt: list[int], step: int = 512) -> int:
        """Fill `session_id`'s cache with `prompt` without generating (reusing
        any cached prefix); returns the number of tokens actually computed."""
        from mlx_lm.generate import maybe_quantize_kv_cache

        self.check_prompt(prompt, GenParams(max_tokens=1))
        s = self.sessions.get(session_id)
        if s.busy:
            raise SessionBusy(f"session {s.id}: already generating")
        if s.cache is not None and s.tokens == list(prompt):
            return 0
        n = self._reuse(s, list(prompt))
        self.sessions.admit(s, len(prompt) - n)
        route = self.remote.last_route(s.id)  # the session's latest routing mode, if remote
        try:
            for i in range(n, len(prompt), step):
                with route.active() if route else nullcontext():
                    self.model(mx.array([prompt[i:i + step]]), cache=s.cache)
                maybe_quantize_kv_cache(s.cache, self.kv_start, self.kv_group_size, self.kv_bits)
                mx.eval([c.state for c in s.cache])
        finally:
            _settle(s, list(prompt))
            s.last_used = time.time()
        return len(prompt) - n

    def _stream(self, s: Session, prompt, steps, chosen, params, max_tokens):
        s.busy = True
        out: list[int] = []
        try:
            pairs = ((int(t), chosen.popleft().item()) for t, _ in steps)
            detok = self.tokenizer.detokenizer if self.tokenizer else NullDetokenizer()
            turn = prompt[len(prompt) - params.resume:]  # a continued turn's tokens so far (exact splice)
            open_end = params.open_end and max_tokens == params.max_tokens  # not the context limit: the turn goes on
            for ev in text_events(pairs, detok, self.eos, params.stop, max_tokens, turn, params.resume_chars, open_end):
                out.append(ev.token)
                yield ev
        finally:
            s.busy = False
            s.turns += 1
            _settle(s, prompt + out)
            s.last_used = time.time()

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
        self.remote.forget(session_id)
        return self.sessions.close(session_id)

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

    def import_session(self, state: dict) -> str:
        if state.get("manifest") != self.manifest.hash:
            raise MlxMoeError(f"session {state.get('id')}: exported from manifest {state.get('manifest')}, this node serves {self.manifest.hash}")
        s = self.sessions.get(state["id"])
        s.tokens = list(state["tokens"])
        s.cache = import_caches(state["caches"])
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
            "session_stats": {sid: dict(st) for sid, st in self.remote.stats.items() if sid in self.sessions.sessions},
            "experts_op": {"layers": list(m.moe_layers), "hidden": int(m.model["config"]["hidden_size"])},
            "backend": backend_name(), "moe_path": self.loaded.moe_path, "fused_layers": self.loaded.fused_layers,
            "uptime_s": time.time() - self.started,
        }


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


def _logprob_sampler(sample):
    """Wrap a sampler so the chosen token's log-probability is computed in the
    same step as the token. Reading it later costs nothing; indexing the
    logprobs vector after the fact would queue a new op behind the next step
    and stall mlx-lm's pipelined decode loop (measured: 0.64x on CUDA)."""
    from collections import deque

    chosen = deque()

    def sampler(logprobs):
        y = sample(logprobs)
        lp = mx.take_along_axis(logprobs, y[..., None], axis=-1).squeeze().astype(mx.float32)
        mx.async_eval(lp)
        chosen.append(lp)
        return y

    return sampler, chosen


def backend_name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def _default_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.25)
