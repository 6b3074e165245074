"""What every dialect's handlers share: the app's keys, the client's identity (its API key, checked before the
body is read) and the body itself."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from mlxmoe.cluster.api import fields
from mlxmoe.cluster.limits import Limits
from mlxmoe.cluster.router import Router
from mlxmoe.errors import ApiError


@dataclass(frozen=True)
class HttpLimits:
    """The router's HTTP limits (aiohttp's own knobs; SECURITY.md)."""
    idle_timeout: float = 15.0  # aiohttp's keepalive_timeout: an idle keep-alive connection is closed
    body_timeout: float = 30.0  # a whole body, once the headers are in
    connections: Limits = Limits()  # counted from accept, per address and in all (cluster/limits.py)
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64


ROUTER_KEY = web.AppKey("router", Router)
LIMITS_KEY = web.AppKey("limits", HttpLimits)
TURN = web.RequestKey("mlxmoe_turn", object)  # the request's Turn, for its access line


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def given_key(request: web.Request) -> str:
    """The API key a client sent: `Authorization: Bearer KEY` (OpenAI, Ollama's clients) or `x-api-key: KEY`
    (Anthropic's)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key", "").strip()


def client_of(request: web.Request) -> str:
    """The client's identity: its API key's hash ("" when the router has no
    keys); a missing or wrong key is 401, before the body is read."""
    keys = request.app[ROUTER_KEY].api_keys
    if not keys:
        return ""
    given, match = given_key(request), None
    for k in keys:  # every key compared, in constant time
        if hmac.compare_digest(given.encode(), k.encode()) and given:
            match = k
    if match is not None:
        return key_hash(match)
    raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'", None,
                   "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def body_of(request: web.Request) -> tuple[Router, str, dict]:
    """(the router, the client's identity, the JSON body): the key first, then the body within its limits."""
    owner = client_of(request)
    return request.app[ROUTER_KEY], owner, await fields.read_json(request, request.app[LIMITS_KEY].body_timeout)
