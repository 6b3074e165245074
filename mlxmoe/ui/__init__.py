"""User-facing parts: terminal chat, status page, menu bar, login service,
doctor, progress bars. Helpers shared by several of them live here; they use
only the standard library so importing any UI module stays cheap."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mlxmoe"


def demo_state_path() -> Path:
    """Where a running `mlxmoe demo` writes its router's URL (and its pid), so
    that chat, doctor and menubar in another terminal find it."""
    return config_dir() / "demo.json"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True  # it exists, under another user
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return True


def demo_url() -> str | None:
    """The running demo's router URL; None when no demo runs (a file left by
    a demo that was killed names a dead pid and is ignored)."""
    try:
        st = json.loads(demo_state_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or not isinstance(st.get("url"), str) or not _alive(st.get("pid")):
        return None
    return st["url"]


def default_url() -> str:
    """No --url and no $MLXMOE_URL: a running demo's router, else DEFAULT_URL."""
    return demo_url() or DEFAULT_URL


def base_url(url: str | None) -> str:
    """Accept `host:port`, `http://host:port/` or `.../v1` and return the
    server root without a trailing slash (people paste all three); None or
    "" means default_url()."""
    url = (url or default_url()).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def fetch_status(url: str, timeout: float = 2.0) -> dict:
    """GET the router's /status JSON: with $MLXMOE_API_KEY, the full view of
    this key's sessions; without one, or refused (401), the public view a
    router that asks for a key gives anyone. Raises OSError (unreachable, HTTP
    error) or ValueError (not JSON, e.g. a plain OpenAI server's 404 page)."""
    key = os.environ.get("MLXMOE_API_KEY", "").strip()
    req = urllib.request.Request(base_url(url) + "/status", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        r = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 401:
            raise
        r = urllib.request.urlopen(base_url(url) + "/status/public", timeout=timeout)
    with r:
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
