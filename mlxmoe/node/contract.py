"""Plain data that crosses the node boundary (runtime <-> cluster, CLI, UI).

The cluster code talks to a node's engine only through these types and the
methods listed on `Engine`, so it can be tested against a fake engine and the
wire format stays msgpack-friendly (every field is a plain scalar/list/dict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

if TYPE_CHECKING:  # annotations only: this module stays plain data
    from mlxmoe.model.placement import PlacementScores


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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenParams":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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
    from dataclasses import replace
    return replace(params, **{k: defaults.get(k, SAMPLING_DEFAULTS[k]) for k in SAMPLING_DEFAULTS
                              if getattr(params, k) is None})


@dataclass
class TokenEvent:
    """One generated token. `finish_reason` is set on the last event only
    ("stop" for EOS or a stop string, "length" for max_tokens). `top_logprobs`:
    with GenParams.top_logprobs = N > 0, the N most likely tokens at this step,
    most likely first, as {"token": id, "text": str, "logprob": float}."""

    token: int
    text: str
    logprob: float
    finish_reason: str | None = None
    top_logprobs: list[dict] | None = None
    piece: str | None = None  # the token's own text (logprobs name tokens so); `text` is what the stream adds


class _Pending:
    def __repr__(self):
        return "PENDING"


# What a generate() iterator yields when it has no token this round: another stream of the
# same engine stepped the shared batch since it last looked (node/batch.py). Consumers that
# drive several streams (cluster/worker.py) skip it; one stream alone never sees it.
PENDING = _Pending()


class Engine(Protocol):
    """What a node offers to the cluster layer: node.engine.Node implements it,
    tests/fakes.FakeEngine too, and tests/contract/ runs one suite on both.
    Every call runs on the one engine thread (cluster.worker). Errors are the
    classes of mlxmoe.errors (the node server maps them to HTTP by class);
    a KeyError means an unknown session."""

    manifest: Any  # the bundle's Manifest: .model_id, .hash, .n_groups (the node's identity)
    group: int  # the expert group this engine holds
    inbox: Any  # node.remote.peers.Inbox: peers' `experts` calls queue here to run on the engine thread;
    # the node server sets its `waker` (jobs queued by other threads, the ring's, run when the engine is idle)

    def info(self) -> dict:
        """Status, plain data: model, manifest_hash, group, n_groups, sessions, active_sessions,
        free_kv (bytes of KV budget left; None: no budget, the node server reports the OS's free
        memory), context_limit, kv_bits, backend, uptime_s, and
        experts_op ({layers, hidden}, or None when this engine serves no remote experts)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text."""

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Token ids of OpenAI-style messages with the generation prompt appended; template_kwargs
        (e.g. `tools=`) go to the chat template."""

    def generate(self, session_id: str | None, prompt: list[int], params: GenParams) -> Iterator[TokenEvent]:
        """Stream TokenEvents continuing `prompt` in session `session_id` (a new one if unknown or None),
        reusing its cached prefix; the last event has finish_reason "stop" (an end token or a stop string,
        whose text is not sent) or "length" (max_tokens, or the context limit reached); special tokens add
        no text; with params.top_logprobs = N each event carries its N best alternatives. Sampling fields
        left None take the model's defaults (model_defaults). Raised before the
        first event: MlxMoeError (bad prompt: empty, ids outside the vocabulary; max_tokens < 1; logit_bias
        ids outside the vocabulary),
        ContextOverflow (len(prompt) >= context_limit, or more KV than the whole budget),
        AdmissionError (KV budget full of busy sessions), SessionBusy (the session is streaming).
        Mid-stream: PeerError when a remote-experts peer failed, anything else when the node did.
        The iterator may yield PENDING between events (no token this round); closing it ends the
        generation."""

    def prepare(self, params: GenParams) -> None:
        """Any thread, before generate: the work a request needs that may take long and never touches
        the model (a grammar compiles, bounded in time), so the engine thread only finds it done.
        MlxMoeError naming the field when a spec cannot be enforced."""

    def prefill(self, session_id: str, prompt: list[int], paced: bool = False) -> int:
        """Fill the session's cache with `prompt` without generating; returns the number of tokens
        computed (0 when the session already holds exactly `prompt`). paced: compute only a step's
        worth (the caller asks again until 0, so other work runs in between). Errors as generate's."""

    def close_session(self, session_id: str) -> bool:
        """Forget the session and its cache; False if it was unknown."""

    def export_session(self, session_id: str) -> dict:
        """The session as plain data {id, tokens, caches, manifest} for import_session on a node of
        the same manifest. KeyError: unknown session; SessionBusy: still streaming."""

    def import_session(self, state: dict) -> str:
        """Adopt an exported session (its next turn reuses the cache); returns its id.
        MlxMoeError: exported from another manifest."""

    def experts(self, layer: int, x: dict, ids: list[int] | None = None, rows: list[int] | None = None) -> dict:
        """The `experts` RPC op (node/remote/): this node's routed-expert output for hidden states x,
        both as tensor dicts {dtype, shape, data}. MlxMoeError: bad ids/rows; Unsupported when
        info()["experts_op"] is None."""

    def attach_cluster(self, key: bytes) -> None:
        """The cluster key, which signs this engine's own calls to peers (set by the node server)."""

    def adopt(self, manifest: dict) -> str:
        """Serve a new manifest (as a dict) of the same model in which this engine's part is
        unchanged (a Mac joined); returns its hash. MlxMoeError naming what differs."""


class Frontend(Protocol):
    """The router's placement front end (node.trunk.TrunkFrontend; tests/fakes.FakeFrontend)."""

    manifest: Any  # .model_id, .hash, .n_groups: which nodes the router accepts
    sampling_defaults: dict  # what a request that leaves a sampling field out gets (model_defaults)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text."""

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Token ids of OpenAI-style messages with the generation prompt appended; template_kwargs
        (e.g. `tools=`) go to the chat template."""

    def score(self, tokens: list[int]) -> PlacementScores:
        """How well each group suits `tokens`. MlxMoeError: no tokens."""
