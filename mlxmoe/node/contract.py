"""Plain data that crosses the node boundary (runtime <-> cluster, CLI, UI).

The cluster code talks to a node's engine only through these types and the
methods listed on `Engine`, so it can be tested against a fake engine and the
wire format stays msgpack-friendly (every field is a plain scalar/list/dict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol


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
    """What a node offers to the cluster layer (implemented by node.engine.Node)."""

    def info(self) -> dict: ...
    def encode_chat(self, messages: list[dict]) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def generate(self, session_id: str, prompt: list[int], params: GenParams) -> Iterator[TokenEvent]: ...
    def close_session(self, session_id: str) -> bool: ...
    def export_session(self, session_id: str) -> dict: ...
    def import_session(self, state: dict) -> str: ...
