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
    # where MoE layers' routed experts run (runtime/remote.py): "local" | "group" | "onehop" | "split"
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


@dataclass
class PlacementScores:
    """S(g) per group (DESIGN.md: mean over scored layers and prompt tokens of
    the top-k probability mass inside eligible(g))."""

    scores: dict[int, float]
    layers: list[int]
    n_tokens: int
    elapsed_ms: float = 0.0

    @property
    def ranked(self) -> list[int]:
        return sorted(self.scores, key=lambda g: (-self.scores[g], g))

    @property
    def best(self) -> int:
        return self.ranked[0]

    @property
    def margin(self) -> float:
        r = self.ranked
        return self.scores[r[0]] - (self.scores[r[1]] if len(r) > 1 else 0.0)

    def to_dict(self) -> dict:
        return {"scores": {str(g): s for g, s in self.scores.items()},
                "layers": self.layers, "n_tokens": self.n_tokens,
                "best": self.best, "margin": self.margin, "elapsed_ms": self.elapsed_ms}


class Engine(Protocol):
    """What a node offers to the cluster layer (implemented by runtime.node.Node)."""

    def info(self) -> dict: ...
    def encode_chat(self, messages: list[dict]) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def generate(self, session_id: str, prompt: list[int], params: GenParams) -> Iterator[TokenEvent]: ...
    def close_session(self, session_id: str) -> bool: ...
    def export_session(self, session_id: str) -> dict: ...
    def import_session(self, state: dict) -> str: ...
