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
    temperature: float = 0.0
    top_p: float = 1.0
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenParams":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TokenEvent:
    """One generated token. `finish_reason` is set on the last event only
    ("stop" for EOS or a stop string, "length" for max_tokens)."""

    token: int
    text: str
    logprob: float
    finish_reason: str | None = None


class Engine(Protocol):
    """What a node offers to the cluster layer: node.engine.Node implements it,
    tests/fakes.FakeEngine too, and tests/contract/ runs one suite on both.
    Every call runs on the one engine thread (cluster.worker). Errors are the
    classes of mlxmoe.errors (the node server maps them to HTTP by class);
    a KeyError means an unknown session."""

    manifest: Any  # the bundle's Manifest: .model_id, .hash, .n_groups (the node's identity)
    group: int  # the expert group this engine holds
    inbox: Any  # node.remote.peers.Inbox: peers' `experts` calls queue here to run on the engine thread

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
        reusing its cached prefix; the last event has finish_reason "stop" (EOS or a stop string, whose
        text is not sent) or "length" (max_tokens, or the context limit reached). Raised before the
        first event: MlxMoeError (bad prompt: empty, ids outside the vocabulary; max_tokens < 1),
        ContextOverflow (len(prompt) >= context_limit, or more KV than the whole budget),
        AdmissionError (KV budget full of busy sessions), SessionBusy (the session is streaming).
        Mid-stream: PeerError when a remote-experts peer failed, anything else when the node did."""

    def prefill(self, session_id: str, prompt: list[int]) -> int:
        """Fill the session's cache with `prompt` without generating; returns the number of tokens
        computed (0 when the session already holds exactly `prompt`). Errors as generate's."""

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


class Frontend(Protocol):
    """The router's placement front end (node.trunk.TrunkFrontend; tests/fakes.FakeFrontend)."""

    manifest: Any  # .model_id, .hash, .n_groups: which nodes the router accepts

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text."""

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Token ids of OpenAI-style messages with the generation prompt appended; template_kwargs
        (e.g. `tools=`) go to the chat template."""

    def score(self, tokens: list[int]) -> PlacementScores:
        """How well each group suits `tokens`. MlxMoeError: no tokens."""
