"""One error hierarchy. Every message names the file, tensor, field or peer at
fault; CLI commands print them without a traceback, and the node server maps
them to HTTP by class (`status`, `code`): `classify` is the one place that does."""

from __future__ import annotations


class MlxMoeError(Exception):
    """Base class: a clear, user-facing problem."""

    status, code = 400, "bad_request"


class CheckpointError(MlxMoeError):
    """A source checkpoint is missing, truncated, corrupt or unsupported."""


class ManifestError(MlxMoeError):
    """distribution.json is invalid, from another model, or does not match its files."""


class BundleError(MlxMoeError):
    """A bundle file is missing or its hash/size does not match the manifest."""


class ContextOverflow(MlxMoeError):
    """A prompt does not fit the node's context limit."""

    code = "context_length_exceeded"


class AdmissionError(MlxMoeError):
    """No memory (KV budget) for another session right now; retry later."""

    status, code = 503, "admission"
    retry_after: float = 2.0


class SessionBusy(MlxMoeError):
    """The session is generating a turn right now; retry when it has ended."""

    status, code = 409, "session_busy"


class Unsupported(MlxMoeError):
    """This node does not offer the operation (e.g. remote experts); no retry helps."""

    status, code = 501, "unsupported"


class PeerError(MlxMoeError):
    """A peer this node called (remote experts) failed; names the peer. Another
    placement may work, so the router retries elsewhere."""

    status, code = 502, "peer_failed"

    def __init__(self, message: str, peer: str | None = None):
        super().__init__(message)
        self.peer = peer


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
    if isinstance(exc, MlxMoeError):
        return exc.status, exc.code
    if isinstance(exc, KeyError):
        return 404, "unknown_session"
    if isinstance(exc, (ValueError, TypeError)):
        return 400, "bad_request"
    return 500, "internal"
