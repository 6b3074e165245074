"""User-facing parts: terminal chat, status page, menu bar, login service,
doctor, progress bars. Helpers shared by several of them live here; they use
only the standard library so importing any UI module stays cheap."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"


def base_url(url: str) -> str:
    """Accept `host:port`, `http://host:port/` or `.../v1` and return the
    server root without a trailing slash (people paste all three)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def fetch_status(url: str, timeout: float = 2.0) -> dict:
    """GET the router's /status JSON. Raises OSError (unreachable, HTTP error)
    or ValueError (not JSON, e.g. a plain OpenAI server's 404 page)."""
    with urllib.request.urlopen(base_url(url) + "/status", timeout=timeout) as r:
        data = json.loads(r.read().decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("/status did not return a JSON object")
    return data


def human_bytes(n: float | None) -> str:
    """Binary units, labelled as such (1 GiB = 1024**3 bytes)."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
