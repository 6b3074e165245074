"""Server-sent events as the OpenAI streaming API frames them: one
`data: <json>` event per chunk, an error event, and `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


STREAM = web.RequestKey("mlxmoe_stream", web.StreamResponse)  # the request's open stream (a client that leaves)


async def open_stream(request: web.Request, headers: dict) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
    request[STREAM] = resp
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, obj: Any) -> None:
    await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")


async def done(resp: web.StreamResponse) -> None:
    await send(resp, b"[DONE]")
