"""One error hierarchy. Every message names the file, tensor, field or peer at
fault; CLI commands print them without a traceback. Every error class derives
from MlxMoeError and carries its HTTP `status` and `code`; `classify` (a node's
answer) and `api_error` (the router's API, whose dialects only shape the body)
are the one place errors become statuses."""

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


class ApiError(MlxMoeError):
    """A request refused (or failed) at the router's API: the status, the request field at fault as the
    client wrote it (`param`), a code and headers (Retry-After). Each dialect shapes the body (cluster/api/)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


class RpcError(MlxMoeError):
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


def api_error(exc: BaseException, param: str | None = None) -> ApiError:
    """Any error as the router's API reports it; `param`: the request field an error of the prompt names.
    A node's refusal is the client's 400, a node's failure a 502, a bug a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RpcError):
        if exc.code == "context_length_exceeded":
            return ApiError(400, exc.message, param, exc.code)
        if 400 <= exc.status < 500:
            return ApiError(400, f"node {exc.peer} refused the request: {exc.message}", None, exc.code)
        return ApiError(502, f"node {exc.peer} failed: {exc.message}", None, exc.code)
    status, code = classify(exc)
    if status >= 500 and not isinstance(exc, MlxMoeError):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}"[:300], None, "internal")
    retry = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(max(1, int(round(retry))))} if retry and status in (429, 503) else {}
    return ApiError(status, str(exc)[:300], param, code, headers)
