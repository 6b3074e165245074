"""Errors a user can act on. Every message names the file, tensor, field or
peer at fault; CLI commands print them without a traceback."""


class MlxMoeError(Exception):
    """Base class: a clear, user-facing problem."""


class CheckpointError(MlxMoeError):
    """A source checkpoint is missing, truncated, corrupt or unsupported."""


class ManifestError(MlxMoeError):
    """distribution.json is invalid, from another model, or does not match its files."""


class BundleError(MlxMoeError):
    """A bundle file is missing or its hash/size does not match the manifest."""


class ContextOverflow(MlxMoeError):
    """A prompt does not fit the node's context limit."""


class AdmissionError(MlxMoeError):
    """No memory (KV budget) for another session right now; retry later."""

    retry_after: float = 2.0


class SessionBusy(MlxMoeError):
    """The session is generating a turn right now; retry when it has ended."""
