"""Grammar-constrained decoding: structured output (response_format json_object /
json_schema) and tool calls (tool_choice "required" or a named function) as an
mlx-lm logits processor, with llguidance (chosen by measurement:
benchmarks/2026-12-01-cpu-grammar-libraries.json; no dependencies, wheels for
macOS arm64 and Linux, microseconds per token mask).

A grammar spec is plain data (it crosses the wire in GenParams.grammar):
    {"type": "json_object"}
    {"type": "json_schema", "schema": {...}}
    {"type": "tool_call", "tools": [OpenAI tools], "choice": "required" | {"name": ...}}
The tool call text is cluster/api/tools.py's format: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
Specs become grammars in grammar_spec.py (no MLX: the router's API checks them with the same code):
schemas under the strict rule, each grammar compiled once, bounded in time, and checked before
the row joins the batch; here, each row deep-copies the compiled matcher.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxmoe.errors import MlxMoeError
from mlxmoe.node.grammar_spec import (JSON_OPTIONS, TOOL_CALL_END, TOOL_CALL_START, compile_spec,  # noqa: F401
                                      grammar_text, strict, tool_schema)


_TOKENIZERS: dict = {}  # id(tokenizer) -> (tokenizer, LLTokenizer): building one costs ~0.1-1 s


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of an HF tokenizer (or mlx-lm's TokenizerWrapper around one),
    with every end token the node stops on as EOS."""
    import llguidance.hf

    key = (id(tokenizer), vocab_size)
    if key not in _TOKENIZERS:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos))
    return _TOKENIZERS[key][1]


class Constrained:
    """One generation's constrained-decoding state, as an mlx-lm logits processor:
    `processor(tokens, logits)` first advances the matcher by the token sampled last
    (tokens[-1], from the previous call's mask), then masks disallowed tokens to -inf."""

    def __init__(self, spec: dict, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        # compiled (or taken from the cache) and checked here, before the row joins the batch:
        # a schema that cannot be enforced is an MlxMoeError naming its field (grammar_spec.py)
        self.matcher = compile_spec(spec, ll_tokenizer(tokenizer, vocab_size)).deep_copy()
        self.started = False

    @property
    def done(self) -> bool:
        """The grammar is complete: only an end token may follow."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        if self.matcher.is_error():  # past the parser limits (grammar_spec.LIMITS): this row ends, with why
            raise MlxMoeError(f"grammar: {self.matcher.get_error().splitlines()[0][:240]}")
        return np.unpackbits(words, bitorder="little")[:self.vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise MlxMoeError(f"grammar: token {token} was not allowed ({self.matcher.get_error()})")

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.advance(tokens[-1].item())
        self.started = True
        mask = self.allowed()
        if logits.shape[-1] > mask.size:  # padded model vocabularies: the extra rows are never allowed
            mask = np.pad(mask, (0, logits.shape[-1] - mask.size))
        return mx.where(mx.array(mask[: logits.shape[-1]]), logits, mx.array(-float("inf"), dtype=logits.dtype))


def processor(spec: dict | None, tokenizer, vocab_size: int, resume: list[int] = ()) -> Constrained | None:
    """The logits processor of a grammar spec (None: unconstrained). resume: the turn's tokens
    so far when it continues on this node (failover, migration, after a race: GenParams.resume),
    consumed first so the constraint goes on from where the other node left it."""
    if spec is None:
        return None
    if tokenizer is None:
        raise MlxMoeError("grammar: this node has no tokenizer")
    c = Constrained(spec, tokenizer, vocab_size)
    for t in resume:
        if not c.matcher.consume_token(int(t)):
            raise MlxMoeError(f"params.resume: token {t} of the resumed turn does not fit the grammar "
                              f"({c.matcher.get_error()})")
    return c


def precompile(spec: dict | None, tokenizer, vocab_size: int) -> None:
    """Compile and check a spec into the cache (grammar_spec.compile_spec) from any thread, so that
    `processor` on the engine thread finds it ready; MlxMoeError naming the field when it cannot be
    enforced. A no-op without a spec or a tokenizer."""
    if spec is not None and tokenizer is not None:
        compile_spec(spec, ll_tokenizer(tokenizer, vocab_size))
