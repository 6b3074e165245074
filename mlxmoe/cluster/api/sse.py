"""Streamed answers: server-sent events as OpenAI and Anthropic frame them (`event: <name>` when named,
`data: <json>`, OpenAI's `data: [DONE]`), and newline-delimited JSON as Ollama does."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncGenerator

from aiohttp import web


STREAM = web.RequestKey("mlxmoe_stream", web.StreamResponse)  # the request's open stream (a client that leaves)


async def open_stream(request: web.Request, headers: dict, content_type: str = "text/event-stream") -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache", **headers})
    request[STREAM] = resp
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, obj: Any, event: str | None = None) -> None:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    await resp.write((f"event: {event}\n".encode() if event else b"") + b"data: " + data + b"\n\n")


async def done(resp: web.StreamResponse) -> None:
    await send(resp, b"[DONE]")


async def send_line(resp: web.StreamResponse, obj: Any) -> None:
    """One object of a newline-delimited JSON stream."""
    await resp.write(json.dumps(obj).encode() + b"\n")


async def paced(items: AsyncGenerator, every: float) -> AsyncGenerator:
    """`items`, and None whenever `every` seconds pass without one (a keep-alive's cue). `items` is never
    cancelled for a pause: its next step runs as a task awaited across them (cancelled only when the consumer
    leaves)."""
    step = None
    try:
        while True:
            step = step or asyncio.ensure_future(_next(items))
            if not (await asyncio.wait({step}, timeout=every))[0]:
                yield None
                continue
            done, step = step, None
            try:
                item = done.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if step is not None:
            step.cancel()
            await asyncio.wait({step})
        await items.aclose()


async def _next(items: AsyncGenerator) -> Any:
    return await items.__anext__()
