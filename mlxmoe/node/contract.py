"""Plain data that crosses the node boundary (runtime <-> cluster, CLI, UI).

The cluster code talks to a node's engine only through these types and the
methods listed on `Engine`, so it can be tested against a fake engine and the
wire format stays msgpack-friendly (every field is a plain scalar/list/dict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from mlxmoe.params import GenParams  # the typed request (mlxmoe/params.py)

if TYPE_CHECKING:  # annotations only: this module stays plain data
    from mlxmoe.model.placement import PlacementScores


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
        (e.g. `tools=`) go to the chat template (`add_generation_prompt=False,
        continue_final_message=True`: the last, assistant, message is continued instead)."""

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
        (e.g. `tools=`) go to the chat template (`add_generation_prompt=False,
        continue_final_message=True`: the last, assistant, message is continued instead)."""

    def score(self, tokens: list[int]) -> PlacementScores:
        """How well each group suits `tokens`. MlxMoeError: no tokens."""
