"""How a session is shown, alike by the router (/status, its access lines) and
a node (its access lines): by a short ref, never by its id (an id resumes the
session, docs/SECURITY.md), and its decode rate."""

from __future__ import annotations

import hashlib


def session_ref(sid: str) -> str:
    """A short hash of a session id: shown where the id must not be; it does not resume the session."""
    return "ref-" + hashlib.sha256(sid.encode()).hexdigest()[:16]


def tok_s(n: int, first: float | None, now: float) -> float | None:
    """Decode rate after the first token (TTFT is prefill, not decode); None until there are two."""
    if first is None or n < 2 or now <= first:
        return None
    return round((n - 1) / (now - first), 2)
