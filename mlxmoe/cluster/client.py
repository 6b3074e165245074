"""Router-side client of one node's RPC, on aiohttp. Every byte is built and
checked by mlxmoe/wire.py (the node-to-node client, node/remote/peers.py
PeerLink, shares it); this module is only the async transport.

Every failure surfaces as RpcError with `retryable` set when another node
may succeed (connection lost, node busy, node failed midway). Bytes sent and
received are counted so the router can report traffic per decoded token.
"""

from __future__ import annotations

import asyncio
import socket
from typing import AsyncIterator

import aiohttp
import msgpack

from mlxmoe import wire
from mlxmoe.errors import RpcError
from mlxmoe.params import GenParams


# Who we are to a node: the sessions a `held` list names are this sender's.
# Stable across router restarts, so the first probe after one closes what the
# old process left behind (node_server.close_unheld).
DEFAULT_SRC = f"router@{socket.gethostname()}"


class NodeClient:
    def __init__(self, http: aiohttp.ClientSession, url: str, key: bytes, manifest_hash: str | None = None,
                 name: str | None = None, src: str = DEFAULT_SRC):
        self.http, self.url, self.key, self.mh, self.src = http, url.rstrip("/"), key, manifest_hash, src
        self.name = name or self.url
        self.bytes_out = self.bytes_in = 0
        self.dst: tuple[str, str] | None = None  # (node name, epoch) from /hello

    async def _hello(self, timeout: float | None) -> tuple[str, str]:
        try:
            async with self.http.get(f"{self.url}/hello", timeout=aiohttp.ClientTimeout(total=timeout or 30,
                                                                                         sock_connect=5)) as resp:
                raw = await resp.content.read(4096)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise self._err(0, "unreachable", f"cannot reach node at {self.url}: {type(e).__name__}: {e}", True) from None
        try:
            self.dst = wire.open_hello(raw)
        except wire.WireError as e:
            raise self._err(0, e.code, f"node {self.url}: {e.message}", True) from None
        return self.dst

    def _err(self, status: int, code: str, message: str, retryable: bool, retry_after: float | None = None) -> RpcError:
        return RpcError(status, code, message, retryable=retryable, retry_after=retry_after, peer=self.name)

    async def _post(self, op: str, body: dict, timeout: float | None):
        """(response, nonce); asks /hello first, and again once if the node
        restarted (new epoch) or another node answers at this URL."""
        for attempt in (0, 1):
            node, epoch = self.dst if self.dst is not None else await self._hello(timeout)
            nonce = wire.new_nonce()
            data, headers = wire.encode_request(self.key, op, body, self.mh, nonce=nonce, dst=node, epoch=epoch,
                                                src=self.src)
            self.bytes_out += len(data)
            try:
                resp = await self.http.post(f"{self.url}/rpc/{op}", data=data, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5))
            except aiohttp.ClientSSLError as e:  # certificate refused, either way: another node may be fine
                raise self._err(0, "unreachable", f"TLS handshake with {self.url} failed (are both certificates from "
                                                  f"this cluster's CA? `mlxmoe doctor` checks): {e}", True) from None
            except asyncio.TimeoutError as e:  # slow, not refused: a busy node (the router tells it from a down one)
                raise self._err(0, "timeout", f"node at {self.url} did not answer in {timeout}s: "
                                              f"{type(e).__name__}", True) from None
            except (aiohttp.ClientError, OSError) as e:
                self.dst = None  # it may come back as another run
                raise self._err(0, "unreachable", f"cannot reach node at {self.url}: {type(e).__name__}: {e}", True) from None
            if resp.status == 401 and not attempt:
                raw = await resp.read()
                if wire.refusal(raw).get("code") in wire.REHELLO_CODES:
                    resp.release()
                    self.dst = None
                    continue
            return resp, nonce

    async def _error_from(self, resp: aiohttp.ClientResponse) -> RpcError:
        raw = await resp.read()
        self.bytes_in += len(raw)
        err = wire.refusal(raw)
        code, message = str(err.get("code", "http_" + str(resp.status))), str(err.get("message", f"HTTP {resp.status}"))
        if resp.status == 401:
            message = "node refused our cluster key (401): copy the same cluster.key to every Mac"
        ra = resp.headers.get("Retry-After")
        retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
        retryable = resp.status in (429, 500, 502, 503, 504)
        return self._err(resp.status, code, message, retryable, retry_after)

    async def call(self, op: str, body: dict | None = None, timeout: float | None = 30.0):
        resp, nonce = await self._post(op, body or {}, timeout)
        async with resp:
            if resp.status != 200:
                raise await self._error_from(resp)
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise self._err(0, "disconnected", f"node {self.url} dropped the connection: {e}", True) from None
            self.bytes_in += len(raw)
            try:
                return wire.open_response(self.key, nonce, raw, resp.headers.get(wire.AUTH_HEADER))
            except wire.WireError as e:
                raise self._err(0, e.code, f"node {self.url}: {e.message}", False) from None

    async def generate(self, session: str, prompt: list[int], params: GenParams | dict,
                       token_timeout: float = 60.0) -> AsyncIterator[dict]:
        """Yield the node's frames ({"t": "tok"|"end"}). Raises RpcError for an
        error frame, an HTTP error, a dropped connection, or a silent node."""
        resp, nonce = await self._post("generate", {"session": session, "prompt": prompt,
                                                  "params": params.to_dict() if isinstance(params, GenParams) else params}, None)
        async with resp:
            if resp.status != 200:
                raise await self._error_from(resp)
            if not wire.verify_stream(self.key, nonce, resp.headers.get(wire.AUTH_HEADER)):
                raise self._err(0, "unauthenticated", f"stream from {self.url} is not signed with our cluster key", False)
            unpacker, frames = wire.stream_unpacker(), wire.StreamVerifier(self.key, nonce)
            ended = False
            while not ended:
                try:
                    chunk = await asyncio.wait_for(resp.content.readany(), token_timeout)
                except asyncio.TimeoutError:
                    raise self._err(0, "timeout", f"node {self.url} sent nothing for {token_timeout:.0f}s", True) from None
                except (aiohttp.ClientError, OSError) as e:
                    raise self._err(0, "disconnected", f"node {self.url} dropped the stream: {type(e).__name__}", True) from None
                if not chunk:
                    raise self._err(0, "disconnected", f"node {self.url} closed the stream before its end frame", True)
                self.bytes_in += len(chunk)
                try:
                    unpacker.feed(chunk)
                except msgpack.BufferFull:
                    raise self._err(0, "bad_response", f"oversized frame from {self.url}", True) from None
                for item in _items(unpacker):
                    try:
                        frame = frames.open(item)
                    except wire.WireError as e:
                        raise self._err(0, e.code, f"node {self.url}: {e.message}", True) from None
                    if frame.get("t") == "err":
                        status = int(frame.get("status", 500))
                        raise self._err(status, str(frame.get("code")), str(frame.get("message")),
                                        retryable=status >= 500)
                    yield frame
                    if frame.get("t") == "end":
                        ended = True
                        break


def _items(unpacker):
    """The unpacker's complete items; a malformed one as an unopenable item."""
    while True:
        try:
            yield next(unpacker)
        except StopIteration:
            return
        except Exception:  # msgpack's many errors, our ext refusal: StreamVerifier refuses None
            yield None
            return
