"""Generation parameters: the one typed request that travels from an API dialect to a node
(docs/ARCHITECTURE.md, "The request path").

A dialect adapter (cluster/api/openai.py, anthropic.py, ollama.py) builds a `GenParams` once;
the router edits it with `dataclasses.replace` (routing, a splice's resume, a race's cap);
the wire carries `to_dict()` and checks it against `FIELDS` (wire.py); the node's engine
resolves what was left to the model (`resolve`) and checks the result with the same `check`.
`FIELDS` is the one list of fields with their wire type and range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from mlxmoe.errors import ApiError
from mlxmoe.modes import ROUTING_MODES

MAX_TOKENS_LIMIT = 1 << 20
MAX_LOGIT_BIAS = 1024  # entries
MAX_PEERS = 256
SEED_LIMIT = 1 << 64  # nodes seed with an unsigned 64-bit integer


@dataclass
class GenParams:
    max_tokens: int = 256
    temperature: float | None = 0.0
    top_p: float | None = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # where MoE layers' routed experts run (node/remote/): "local" | "group" | "onehop" | "split"
    routing: str = "local"
    expert_group: int | None = None  # routing="group": the group computing every MoE layer
    peers: dict[str, str] = field(default_factory=dict)  # str(group) -> node URL
    # a turn continued after a failover/migration (node/stream.py): the prompt's last `resume` tokens are
    # this turn's output so far, of whose text the client already has `resume_chars` characters
    resume: int = 0
    resume_chars: int = 0
    open_end: bool = False  # max_tokens ends this call, not the turn (race): nothing held back is flushed
    # constrained decoding (node/grammar.py): {"type": "json_object"} | {"type": "json_schema", "schema": ...}
    # | {"type": "tool_call", "tools": [...], "choice": "required" | {"name": ...}}; None: free text
    grammar: dict | None = None
    # sampling beyond temperature/top_p (mlx-lm's samplers and logits processors, node/engine.py). For the
    # fields that may be None, None means "the model's default" (generation_config.json, else SAMPLING_DEFAULTS):
    # the API sends None for what a request leaves out; library callers get the plain values below
    top_k: int | None = 0  # 0: off
    min_p: float | None = 0.0  # 0: off
    repetition_penalty: float | None = 1.0  # 1: off (mlx-lm's multiplicative penalty over the last 20 tokens)
    presence_penalty: float = 0.0  # OpenAI's additive penalties (mlx-lm's processors)
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = field(default_factory=dict)  # str(token id) -> added to its logit
    top_logprobs: int = 0  # alternatives per token in TokenEvent.top_logprobs (0..20)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: a grammar may be large

    @classmethod
    def from_dict(cls, d: dict) -> "GenParams":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def edit(self, **changes) -> "GenParams":
        """A copy with `changes` (the router's edits)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Field:
    wire: str  # its type in wire.py's schema language ("?": may be nil)
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is out


# The one table: every field of GenParams, its wire type and range (None: no range).
FIELDS: dict[str, Field] = {
    "max_tokens": Field("int", 0, MAX_TOKENS_LIMIT),  # 0: a splice after the last token (the node says so)
    "temperature": Field("num?", 0.0, 2.0),
    "top_p": Field("num?", 0.0, 1.0, lo_open=True),
    "stop": Field("list[str]"),
    "seed": Field("int?", 0, SEED_LIMIT - 1),
    "routing": Field("str"),
    "expert_group": Field("int?", 0, (1 << 16) - 1),
    "peers": Field("dict[str,str]"),
    "resume": Field("int", 0, MAX_TOKENS_LIMIT),
    "resume_chars": Field("int", 0, 1 << 30),
    "open_end": Field("bool"),
    "grammar": Field("dict?"),  # checked by the node (node/grammar_spec.py); the op's size limit bounds it
    "top_k": Field("int?", 0, 1 << 24),
    "min_p": Field("num?", 0.0, 1.0),
    "repetition_penalty": Field("num?", 0.0, 100.0, lo_open=True),
    "presence_penalty": Field("num", -2.0, 2.0),
    "frequency_penalty": Field("num", -2.0, 2.0),
    "logit_bias": Field("dict[str,num]"),
    "top_logprobs": Field("int", 0, 20),
}
assert set(FIELDS) == {f.name for f in fields(GenParams)}, "FIELDS lists every GenParams field"


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class ParamError(ApiError):
    """A field of the request out of its range (a 400): `field` is its GenParams name, `param` as the
    caller wrote it."""

    def __init__(self, message: str, field: str, param: str):
        super().__init__(400, message, param, "invalid_value")
        self.field = field


def check(d: dict, where: str = "params", names: dict[str, str] | None = None) -> None:
    """Every value of `d` (a GenParams as a dict) in its range, else ParamError. The message names the field
    as `where.field`, or as the caller's dialect names it (`names`: GenParams field -> its name there).
    The wire, the node's engine and the API adapters all check with this."""
    def fail(name: str, why: str, sub: str = ""):
        param = (names or {}).get(name) or (f"{where}.{name}" if where else name)
        raise ParamError(f"'{param}{sub}' {why}"[:300], name, param)

    for name, f in FIELDS.items():
        v = d.get(name)
        if v is None or f.lo is None:
            continue
        whole = f.wire.startswith("int")
        if not _number(v) or (whole and not isinstance(v, int)) or (v <= f.lo if f.lo_open else v < f.lo) or v > f.hi:
            bound = f"({_n(f.lo)}, {_n(f.hi)}]" if f.lo_open else f"{_n(f.lo)}..{_n(f.hi)}"
            fail(name, f"must be {'an integer' if whole else 'a number'} in {bound}, got {str(v)[:40]}")
    bias = d.get("logit_bias") or {}
    if len(bias) > MAX_LOGIT_BIAS:
        fail("logit_bias", f"has more than {MAX_LOGIT_BIAS} entries")
    for k, v in bias.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 9):
            fail("logit_bias", f"keys must be token ids (digits), got {str(k)[:20]!r}")
        if not _number(v) or not -100 <= v <= 100:
            fail("logit_bias", "must be a number in -100..100", f"[{k}]")
    _check_routing(d, fail)


def _check_routing(d: dict, fail) -> None:
    routing, eg, peers = d.get("routing", "local"), d.get("expert_group"), d.get("peers") or {}
    if routing not in ROUTING_MODES:
        fail("routing", f"{str(routing)[:20]!r} is not one of {', '.join(ROUTING_MODES)}")
    if len(peers) > MAX_PEERS:
        fail("peers", f"has more than {MAX_PEERS} entries")
    for g, url in peers.items():
        if not g.isdigit() or len(g) > 5:
            fail("peers", f"key {g[:20]!r} is not a group id")
        if not url.startswith(("http://", "https://")) or len(url) > 512:
            fail("peers", "must be an http(s) URL", f".{g}")
    if routing == "group" and eg is None:
        fail("expert_group", "is required with routing 'group'")


# What a request that leaves a sampling field out gets when the model's generation_config.json does not say.
# repetition_penalty 1.1: greedy decoding of small or masked models falls into loops (the reference model's
# demo answer repeated itself for 512 tokens); mlx-lm's penalty only touches the last 20 tokens.
SAMPLING_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.1}
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_defaults(generation_config: dict | None) -> dict:
    """The sampling defaults of a model: its generation_config.json's values
    (do_sample false means greedy, as in transformers), else SAMPLING_DEFAULTS."""
    out = dict(SAMPLING_DEFAULTS)
    gc = generation_config if isinstance(generation_config, dict) else {}
    for k in GENERATION_CONFIG_KEYS:
        v = gc.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
            out[k] = type(SAMPLING_DEFAULTS[k])(v)
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def resolve(params: GenParams, defaults: dict) -> GenParams:
    """`params` with every None sampling field replaced by the model's default."""
    return replace(params, **{k: defaults.get(k, SAMPLING_DEFAULTS[k]) for k in SAMPLING_DEFAULTS
                              if getattr(params, k) is None})
