"""A node's RPC server: exposes one Engine over the authenticated msgpack RPC.

POST /rpc/<op>  with op in wire.OPS. `experts` (another node's remote
routed-expert call, node/remote/) runs through the engine's inbox, so it
is served even while this node's engine thread waits on a peer itself.
`generate` answers with a stream of
msgpack frames (one per token, then an end frame, or an error frame if the
engine fails midway). Errors found before the first token get a real HTTP
status instead (503 + Retry-After when the engine's KV budget is full), so the
router can try another node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from aiohttp import web

from mlxmoe.node.contract import Engine, GenParams, TokenEvent

from mlxmoe import wire
from mlxmoe.errors import Unsupported, classify
from mlxmoe.cluster.worker import EngineWorker

log = logging.getLogger("mlxmoe.node")
RETRY_AFTER_S = 2


def engine_identity(engine: Engine) -> dict:
    """model / manifest hash / groups of an engine (what discovery and the router check)."""
    m = engine.manifest
    return {"model": m.model_id, "manifest_hash": m.hash, "n_groups": m.n_groups, "groups": [int(engine.group)]}


def default_name(groups: list[int], port: int) -> str:
    import socket
    host = socket.gethostname().split(".")[0] or "mac"
    return f"{host}-g{'_'.join(str(g) for g in groups)}-{port}"


def free_memory() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported platform: report unknown
        return 0


class NodeServer:
    """`engine`, or `factory` (called on the engine thread: MLX streams belong
    to the thread that made them, so the model must be loaded where it runs)."""

    def __init__(self, engine: Engine | None, key: bytes, identity: dict | None = None, factory: Callable | None = None):
        self.engine, self.key, self.factory = engine, key, factory
        self.worker = EngineWorker()
        self.guard = wire.ReplayGuard()
        self.identity = identity  # filled by init_identity() from the engine if None
        self.sessions: set[str] = set()
        self.active = 0
        self.bytes_in = self.bytes_out = 0
        self.on_change: Callable[[], None] | None = None  # e.g. refresh Bonjour TXT
        self._transports: set = set()
        self.started = time.time()
        self.name = "node"
        self._last_load: dict | None = None
        self.refresher: asyncio.Task | None = None
        self._refreshing = False
        self._attached = False
        self._experts_spec: dict | None = None

    # ---- lifecycle
    async def init_identity(self) -> dict:
        if self.engine is None:
            self.engine = await self.worker.call(self.factory)
        if not self._attached:
            self.engine.attach_cluster(self.key)  # the engine signs its own calls to peers (remote experts)
            self._attached = True
        if self.identity is None:
            self.identity = engine_identity(self.engine)
        return self.identity

    def app(self) -> web.Application:
        # client_max_size is ours to enforce per op (streamed read below)
        app = web.Application(client_max_size=max(wire.OP_MAX_BYTES.values()) + 1)
        app.router.add_post("/rpc/{op}", self.handle)
        return app

    def stats(self) -> dict:
        return self._last_load or self._load({})

    def _load(self, info: dict) -> dict:
        """Sessions and free memory, preferring what the engine knows (its KV
        budget left says more about admission than the OS's free memory)."""
        free = info.get("free_kv")  # info is {} before the first info() call
        self._last_load = {
            "sessions": int(info.get("sessions", len(self.sessions))),
            "active": self.active,
            "free_memory": int(free) if free is not None else free_memory()}
        return self._last_load

    def _changed(self) -> None:
        """Sessions or memory changed: refresh the Bonjour TXT (soon, once)."""
        if self.on_change is None or self._refreshing:
            return
        self._refreshing = True
        asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(self._refresh()))

    async def _refresh(self) -> None:
        try:
            self._load(await self.worker.call(self.engine.info))
            self.on_change()
        except Exception:
            log.exception("refreshing node load failed")
        finally:
            self._refreshing = False

    def abort_connections(self) -> None:
        """Drop every open connection at once (tests: a node that dies)."""
        for t in list(self._transports):
            t.abort()

    # ---- request handling
    async def handle(self, request: web.Request) -> web.StreamResponse:
        t = request.transport
        if t is not None:
            self._transports.add(t)
        try:
            return await self._handle(request)
        finally:
            if t is not None:
                self._transports.discard(t)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = request.match_info["op"]
        await self.init_identity()
        try:
            data = await self._read(request, op)
            self.bytes_in += len(data)
            req = wire.decode_request(self.key, data, request.headers.get(wire.AUTH_HEADER), op, self.guard)
            if req.mh is not None and req.mh != self.identity["manifest_hash"]:
                raise wire.WireError(409, "manifest_mismatch",
                                     f"field 'mh': caller expects manifest {req.mh}, this node serves "
                                     f"{self.identity['manifest_hash']} (another model revision)", "mh")
        except wire.WireError as e:
            return self._error(e, None)
        try:
            if op == "generate":
                return await self._generate(request, req)
            body = await getattr(self, "_op_" + op)(req.body)
            return self._reply(wire.ok_response(body), req.nonce)
        except wire.WireError as e:
            return self._error(e, req.nonce)
        except Exception as e:  # engine errors become clear RPC errors, never a crash
            return self._error(self._engine_error(e, op), req.nonce)

    async def _read(self, request: web.Request, op: str) -> bytes:
        limit = wire.max_bytes(op)
        if request.content_length is not None and request.content_length > limit:
            raise wire.WireError(413, "too_large", f"request is {request.content_length} bytes; "
                                                   f"the limit for '{op}' is {limit}")
        chunks, n = [], 0
        while True:
            chunk = await request.content.read(1 << 16)
            if not chunk:
                break
            n += len(chunk)
            if n > limit:
                raise wire.WireError(413, "too_large", f"request exceeds the {limit}-byte limit for '{op}'")
            chunks.append(chunk)
        return b"".join(chunks)

    def _engine_error(self, e: Exception, op: str) -> wire.WireError:
        status, code = classify(e)
        msg = str(e) or type(e).__name__
        if isinstance(e, KeyError):
            msg = f"unknown session {e.args[0]!r}" if e.args else "unknown session"
        if status == 500:
            log.exception("engine failed in %s", op)
            msg = f"engine failed in '{op}': {type(e).__name__}: {msg}"
        err = wire.WireError(status, code, msg)
        ra = getattr(e, "retry_after", None)
        err.retry_after = int(ra) if isinstance(ra, (int, float)) and ra > 0 else None
        return err

    def _reply(self, data: bytes, nonce: str | None, status: int = 200, headers: dict | None = None) -> web.Response:
        h = {"Content-Type": wire.CONTENT_TYPE, **(headers or {})}
        if nonce is not None:  # only authenticated requests get an authenticated answer
            h[wire.AUTH_HEADER] = wire.response_mac(self.key, nonce, data)
        self.bytes_out += len(data)
        return web.Response(body=data, status=status, headers=h)

    def _error(self, e: wire.WireError, nonce: str | None) -> web.Response:
        headers = {"Retry-After": str(e.retry_after or RETRY_AFTER_S)} if e.status in (503, 429) else None
        return self._reply(wire.error_response(e), nonce, e.status, headers)

    # ---- ops
    async def _op_info(self, body: dict) -> dict:
        info = await self.worker.call(self.engine.info)
        out = {k: v for k, v in info.items() if isinstance(k, str)}
        out.update(self.identity)
        out.update(self._load(info))
        out["protocol"] = wire.PROTOCOL_VERSION
        out["node_name"] = self.name
        out["uptime_s"] = time.time() - self.started
        return out

    async def _op_prefill(self, body: dict) -> dict:
        sid, prompt = body["session"], body["prompt"]
        await self.worker.call(self.engine.prefill, sid, prompt)
        self.sessions.add(sid)
        self._changed()
        return {"session": sid, "prompt_tokens": len(prompt)}

    async def _op_close(self, body: dict) -> dict:
        closed = bool(await self.worker.call(self.engine.close_session, body["session"]))
        self.sessions.discard(body["session"])
        self._changed()
        return {"closed": closed}

    async def _op_export_session(self, body: dict) -> dict:
        return await self.worker.call(self.engine.export_session, body["session"])

    async def _op_import_session(self, body: dict) -> dict:
        sid = await self.worker.call(self.engine.import_session, body["state"])
        self.sessions.add(sid)
        self._changed()
        return {"session": sid}

    async def _op_experts(self, body: dict) -> dict:
        layer, x = body["layer"], body["x"]
        spec = self._experts_spec or (await self.worker.call(self.engine.info))["experts_op"]
        if spec is None:
            raise Unsupported("this node does not serve remote experts")
        self._experts_spec = spec
        layers = spec["layers"]
        if layer not in layers:
            raise wire.WireError(400, "schema", f"field 'body.layer': {layer} is not a MoE layer of this model "
                                                f"(MoE layers: {layers[:8]}{'...' if len(layers) > 8 else ''})", "body.layer")
        if x["shape"][-1] != spec["hidden"]:
            raise wire.WireError(400, "schema", f"field 'body.x.shape': hidden size {x['shape'][-1]} does not match "
                                                f"this model's {spec['hidden']}", "body.x.shape")
        ids = body.get("ids")  # (ids, rows) checked against x's shape by wire.check_expert_ids
        args = (layer, x) if ids is None else (layer, x, ids, body.get("rows"))
        inbox = self.engine.inbox
        fut = inbox.submit(lambda: self.engine.experts(*args))
        self._kick = asyncio.ensure_future(self.worker.call(inbox.drain))  # serves it now if the engine is idle
        return {"y": await asyncio.wrap_future(fut)}

    async def _generate(self, request: web.Request, req: wire.Request) -> web.StreamResponse:
        sid, prompt = req.body["session"], req.body["prompt"]
        params = GenParams.from_dict(req.body["params"])
        stream = self.worker.stream(lambda: self.engine.generate(sid, prompt, params))
        self.active += 1
        self.sessions.add(sid)
        self._changed()
        try:
            return await self._pump(request, req, stream, len(prompt))
        finally:
            stream.cancel()
            self.active -= 1
            self._changed()

    async def _pump(self, request, req, stream, n_prompt) -> web.StreamResponse:
        it = stream.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:  # failed before any token: a plain HTTP error
            return self._error(self._engine_error(e, "generate"), req.nonce)
        resp = web.StreamResponse(headers={"Content-Type": wire.CONTENT_TYPE,
                                           wire.AUTH_HEADER: wire.stream_mac(self.key, req.nonce)})
        await resp.prepare(request)
        n, finish = 0, None
        try:
            ev = first
            while ev is not None:
                n += 1
                finish = ev.finish_reason
                await self._write(resp, {"t": "tok", "token": int(ev.token), "text": ev.text,
                                         "logprob": float(ev.logprob), "finish_reason": ev.finish_reason})
                ev = await _next_or_none(it)
            await self._write(resp, {"t": "end", "prompt_tokens": n_prompt, "completion_tokens": n,
                                     "finish_reason": finish or "length"})
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the router went away; `finally` in _generate cancels the stream
        except Exception as e:
            err = self._engine_error(e, "generate")
            await self._write(resp, {"t": "err", "status": err.status, "code": err.code, "message": err.message})
        await resp.write_eof()
        return resp

    async def _write(self, resp: web.StreamResponse, frame: dict) -> None:
        data = wire.pack(frame)
        self.bytes_out += len(data)
        await resp.write(data)


async def _next_or_none(it) -> TokenEvent | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


TXT_REFRESH_S = 30.0  # free memory drifts even without session events


async def _refresh_every(server: NodeServer, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        server._changed()


class RunningNode:
    """A started node server (and its Bonjour registration, if any)."""

    def __init__(self, server: NodeServer, runner: web.AppRunner, host: str, port: int, advertiser=None):
        self.server, self.runner, self.host, self.port, self.advertiser = server, runner, host, port, advertiser

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self.server.refresher is not None:
            self.server.refresher.cancel()
        if self.advertiser is not None:
            await self.advertiser.stop()
        await self.runner.cleanup()
        self.server.worker.stop()

    async def kill(self) -> None:
        """Vanish like a crashed Mac: no goodbye, connections dropped."""
        self.server.abort_connections()
        if self.server.refresher is not None:
            self.server.refresher.cancel()
        if self.advertiser is not None and self.advertiser.azc is not None:
            await self.advertiser.azc.async_close()  # no unregister: peers see it only via probes
            self.advertiser.azc = None
        await self.runner.cleanup()
        self.server.worker.stop()


async def start_node(engine: Engine | None, key: bytes, host: str = "0.0.0.0", port: int = 0, advertise: bool = True,
                     interface: str | None = None, identity: dict | None = None,
                     name: str | None = None, factory: Callable | None = None) -> RunningNode:
    """Start serving `engine` (or the engine `factory()` builds on the engine thread)."""
    from mlxmoe.cluster.discovery import Advertiser, txt_props

    server = NodeServer(engine, key, identity, factory)
    try:
        ident = await server.init_identity()
    except BaseException:  # e.g. the bundle fails to load: no engine thread may outlive us (MLX aborts at exit)
        server.worker.stop()
        await asyncio.to_thread(server.worker.join, 10)
        raise
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = runner.addresses[0][1]
    adv = None
    if advertise:
        adv = Advertiser(port, txt_props(ident, server.stats()), interface=interface, host_ip=host, name=name)
        await adv.start()
        server.on_change = lambda: adv.update(txt_props(ident, server.stats()))
        server.refresher = asyncio.ensure_future(_refresh_every(server, TXT_REFRESH_S))
    server.name = adv.name if adv else (name or default_name(ident["groups"], port))
    return RunningNode(server, runner, host, port, adv)


async def serve_node(engine: Engine | None, key: bytes, host: str = "0.0.0.0", port: int = 0, advertise: bool = True,
                     interface: str | None = None, ready: Callable[[RunningNode], None] | None = None,
                     factory: Callable | None = None) -> None:
    """Run a node until SIGINT/SIGTERM."""
    from mlxmoe.cluster.worker import until_signalled

    node = await start_node(engine, key, host, port, advertise, interface, factory=factory)
    ident = node.server.identity
    print(f"mlxmoe node: {ident['model']} groups {ident['groups']} (manifest {ident['manifest_hash'][:12]}) "
          f"serving on {node.url}" + (f", advertised as {node.advertiser.name}" if node.advertiser else
                                       ", not advertised (list it in the router's --peers file)"), flush=True)
    if ready:
        ready(node)
    await until_signalled()
    await node.stop()
