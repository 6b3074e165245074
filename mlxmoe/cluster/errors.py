"""Error types the cluster layer relies on.

The runtime's errors live in `mlxmoe.errors` (written by the runtime); we use
them when present. Classification goes by class name along the MRO, so an
engine raising either the runtime's classes or these fallbacks maps to the
same HTTP status.
"""

from __future__ import annotations

try:  # the runtime's own classes, once that module exists
    from mlxmoe.errors import AdmissionError, ContextOverflow, MlxMoeError  # type: ignore
except ImportError:  # pragma: no cover - depends on checkout state
    class MlxMoeError(Exception):
        """Base class for errors with a message meant for the user."""

    class ContextOverflow(MlxMoeError):
        """The prompt (plus max_tokens) does not fit the context limit."""

    class AdmissionError(MlxMoeError):
        """The node's KV budget is full even after evicting idle sessions."""


class RpcError(Exception):
    """A node answered with an error (or the call failed). `retryable` says
    whether another node may succeed where this one failed."""

    def __init__(self, status: int, code: str, message: str, *, retryable: bool = False,
                 retry_after: float | None = None, peer: str | None = None):
        super().__init__(f"{peer + ': ' if peer else ''}{message}")
        self.status, self.code, self.message = status, code, message
        self.retryable, self.retry_after, self.peer = retryable, retry_after, peer


def classify(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) for an exception raised by an engine."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "PeerError" in names:  # a peer this node called (remote experts) failed: another placement may work
        return 502, "peer_failed"
    if "AdmissionError" in names:
        return 503, "admission"
    if "SessionBusy" in names:
        return 409, "session_busy"
    if "ContextOverflow" in names:
        return 400, "context_length_exceeded"
    if "MlxMoeError" in names:
        return 400, "bad_request"
    if isinstance(exc, KeyError):
        return 404, "unknown_session"
    if isinstance(exc, (ValueError, TypeError)):
        return 400, "bad_request"
    return 500, "internal"
