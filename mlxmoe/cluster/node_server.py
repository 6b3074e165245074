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
import hashlib
import logging
import os
import time
from typing import Callable

from aiohttp import web

from mlxmoe.node.contract import Engine, TokenEvent
from mlxmoe.params import GenParams

from mlxmoe import wire
from mlxmoe.errors import MlxMoeError, Unsupported, classify
from mlxmoe.cluster.limits import GuardedSite, Limits
from mlxmoe.cluster.parts import add_node_routes
from mlxmoe.cluster.worker import EngineWorker
from mlxmoe.cluster import accesslog
from mlxmoe.cluster.sessionview import session_ref, tok_s

log = logging.getLogger("mlxmoe.node")
ACCESS = web.RequestKey("mlxmoe_access", dict)  # request key: this RPC's access-line fields (session ref, tokens, TTFT, tok/s)
RETRY_AFTER_S = 2
MAX_STREAMS = 16  # streams decoded at once (one batched step per round: node/batch.py); later ones wait in order
MAX_QUEUE = 16  # streams waiting beyond those; past this a generate gets 429 overloaded + Retry-After
INFO_WAIT_S = 0.2  # how long info waits for a fresh engine answer before serving the snapshot
SESSION_TTL_S = 3600.0  # idle sessions are closed after this (mlxmoe node --session-ttl)
SELF_CHECK = "self-check"  # the session of the start-up generation (self_check)
HELD_GRACE_S = 60.0  # a session its router does not list is closed only once idle this long
# HTTP limits (docs/SECURITY.md). aiohttp's keep-alive timer also runs from
# the connection's start until a request's headers are complete, so it is the
# header timeout too; the body timeout is ours.
KEEPALIVE_S = 15.0
BODY_TIMEOUT_S = 120.0  # 256 MiB import_session at ~2 MB/s
MAX_CONNECTIONS = 256
# lingering_time 0: a refused body is never read, not even to be discarded
HTTP_LIMITS = {"max_line_size": 4096, "max_field_size": 4096, "max_headers": 32, "lingering_time": 0}


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

    def __init__(self, engine: Engine | None, key: bytes, identity: dict | None = None, factory: Callable | None = None,
                 max_streams: int | None = MAX_STREAMS, max_queue: int = MAX_QUEUE):
        self.engine, self.key, self.factory = engine, key, factory
        self.worker = EngineWorker(max_streams=max_streams)
        self.max_queue = max_queue
        self._fresh: asyncio.Future | None = None  # the one engine-info refresh in flight
        self.guard = wire.ReplayGuard()
        self.identity = identity  # filled by init_identity() from the engine if None
        self.sessions: dict[str, tuple[str, float]] = {}  # id -> (owner: the preamble's src, last used)
        self._busy: dict[str, int] = {}  # session id -> open generate streams
        self.session_ttl = SESSION_TTL_S
        self.epoch = os.urandom(8).hex()  # per process: a request signed for an earlier run is refused
        self.body_timeout = BODY_TIMEOUT_S
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
        self.unavailable: str | None = None  # why the engine cannot generate (self_check); then the node is not up

    # ---- lifecycle
    async def init_identity(self) -> dict:
        if self.engine is None:
            self.engine = await self.worker.call(self.factory)
        if not self._attached:
            self.engine.attach_cluster(self.key)  # the engine signs its own calls to peers (remote experts)
            self._set_waker(asyncio.get_running_loop())
            self.worker.watch(self.engine.info)
            self._attached = True
            self.unavailable = await self.worker.call(self_check, self.engine)
            if self.unavailable:
                log.error("node %s cannot generate, so it is not up: %s", self.name, self.unavailable)
            await self.worker.call(self.worker.refresh_snapshot)  # the engine is idle now: health has data from the start
            # what a peer's `experts` call is checked against, known now: asking the engine later could wait on a
            # job that waits on that very peer (two nodes calling each other)
            self._experts_spec = (self.worker.snapshot or {}).get("experts_op")
        if self.identity is None:
            self.identity = engine_identity(self.engine)
        return self.identity

    def _set_waker(self, loop) -> None:
        """Jobs the engine's inbox gets from other threads (node/remote/ring.py) are run when it is idle."""
        inbox = getattr(self.engine, "inbox", None)
        if inbox is None or not hasattr(inbox, "drain"):
            return

        def wake():
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.worker.call(inbox.drain)))
        inbox.waker = wake

    def app(self) -> web.Application:
        # client_max_size is ours to enforce per op (streamed read below)
        app = web.Application(client_max_size=max(wire.OP_MAX_BYTES.values()) + 1)
        app.router.add_post("/rpc/{op}", self.handle)
        app.router.add_get("/hello", self.hello)
        add_node_routes(app, self)  # GET /parts/{mh}/{name}: its bundle files, for joining nodes (cluster/parts.py)
        return app

    async def hello(self, request: web.Request) -> web.Response:
        """Unauthenticated: the name and epoch a signed request must name."""
        return web.Response(body=wire.hello_response(self.name, self.epoch), content_type=wire.CONTENT_TYPE)

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
            self._load(await self._engine_info())  # not queued behind decoding (health)
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
        t0, status = time.perf_counter(), 499  # 499: the caller went away first
        try:
            resp = await self._handle(request)
            status = resp.status
            return resp
        except ConnectionResetError:  # the caller went away (its stream is cancelled: _generate): 499, quietly
            return web.Response(status=499)
        finally:
            if t is not None:
                self._transports.discard(t)
            d = {"op": request.match_info.get("op"), "status": status, **request.get(ACCESS, {})}
            d["ms"] = round((time.perf_counter() - t0) * 1000, 1)
            accesslog.emit(d, quiet=d["op"] == "info")  # info is the router's probe, every few seconds

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = request.match_info["op"]
        await self.init_identity()
        nonce = None
        try:
            pre = wire.open_preamble(self.key, request.headers, op, self.name, self.epoch, self.guard,
                                     request.content_length)
            nonce = pre.nonce
            data, digest = await asyncio.wait_for(self._read(request, pre), self.body_timeout)
            self.bytes_in += len(data)
            req = wire.open_body(pre, data, digest)
            sid = req.body.get("session") if isinstance(req.body, dict) else None
            if isinstance(sid, str):
                request[ACCESS] = {"session": session_ref(sid)}
            if req.mh is not None and req.mh != self.identity["manifest_hash"]:
                raise wire.WireError(409, "manifest_mismatch",
                                     f"field 'mh': caller expects manifest {req.mh}, this node serves "
                                     f"{self.identity['manifest_hash']} (another model revision)", "mh")
        except asyncio.TimeoutError:
            return self._refuse(request, wire.WireError(408, "timeout", f"body not received in {self.body_timeout:.0f}s"),
                                nonce)
        except wire.WireError as e:
            return self._refuse(request, e, nonce)
        try:
            if op == "generate":
                return await self._generate(request, req)
            body = await getattr(self, "_op_" + op)(req.body, req.src)
            return self._reply(wire.ok_response(body), req.nonce)
        except wire.WireError as e:
            return self._error(e, req.nonce)
        except ConnectionResetError:
            raise
        except Exception as e:  # engine errors become clear RPC errors, never a crash
            return self._error(self._engine_error(e, op), req.nonce)

    def _refuse(self, request: web.Request, e: wire.WireError, nonce: str | None) -> web.Response:
        """Answer a refused request; close the connection if its body is unread,
        so aiohttp does not read (linger on) what we refused to read."""
        resp = self._error(e, nonce if e.status != 401 else None)
        if not request.content.is_eof():
            resp.force_close()
        return resp

    async def _read(self, request: web.Request, pre: wire.Preamble) -> tuple[bytes, bytes]:
        """Exactly the signed length (open_preamble matched Content-Length to
        it), hashing as it arrives."""
        chunks, n, h = [], 0, hashlib.sha256()
        while n < pre.length:
            chunk = await request.content.read(min(1 << 16, pre.length - n))
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
            chunks.append(chunk)
        return b"".join(chunks), h.digest()

    def _engine_error(self, e: Exception, op: str) -> wire.WireError:
        status, code = classify(e)
        msg = str(e) or type(e).__name__
        if isinstance(e, KeyError) and op == "import_session":  # wire checked the outline; a cache's insides failed
            return wire.WireError(400, "schema", f"field 'body.state.caches': malformed session state "
                                                 f"(missing {str(e)[:60]})", "body.state.caches")
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
    async def _op_info(self, body: dict, src: str) -> dict:
        if "held" in body:
            await self.close_unheld(src, set(body["held"]))
        return await self.health()

    # ---- health: answered on the event loop, never queued behind decoding
    async def health(self) -> dict:
        """The node's info: the engine's own (fresh when its thread is free
        within INFO_WAIT_S, else its latest snapshot, `info_age_s` old) and
        the worker's live load. A busy node answers at once: busy is not down."""
        info = await self._engine_info()
        out = {k: v for k, v in info.items() if isinstance(k, str)}
        out.update(self.identity)
        out.update(self._load(info))
        out.update(self.queue_state())
        out["info_age_s"] = max(0.0, time.time() - self.worker.snapshot_at) if self.worker.snapshot_at else None
        out["protocol"] = wire.PROTOCOL_VERSION
        out["node_name"] = self.name
        out["epoch"] = self.epoch
        out["session_ttl_s"] = self.session_ttl
        out["uptime_s"] = time.time() - self.started
        if self.unavailable:
            out["unavailable"] = self.unavailable
        return out

    def queue_state(self) -> dict:
        """Streams decoding and waiting, the bounds, seconds since the last
        token round, and how long the engine has been busy in one job or round
        (`stalled_s`: a long prefill, or a wedged engine the router gives up on)."""
        w = self.worker.load()
        since = time.time() - w["last_step"] if w["last_step"] else None
        return {"streams": w["streams"], "queued": w["queued"], "max_streams": self.worker.max_streams,
                "max_queue": self.max_queue, "busy": w["busy"], "last_step_s": since, "step_ms": w["step_ms"],
                "stalled_s": w["stalled_s"]}

    async def _engine_info(self) -> dict:
        """A busy engine refreshes its snapshot itself between token rounds
        (worker.watch); an idle one is asked now, once at a time."""
        if not self.worker.idle and (self._fresh is None or self._fresh.done()):
            return self.worker.snapshot or {}
        if self._fresh is None or self._fresh.done():
            self._fresh = asyncio.ensure_future(self.worker.call(self.worker.refresh_snapshot))
        try:
            info = await asyncio.wait_for(asyncio.shield(self._fresh), INFO_WAIT_S)
        except asyncio.TimeoutError:  # a job came in first (a long prefill): the snapshot will do
            info = self.worker.snapshot
        return info or {}

    def overloaded(self) -> wire.WireError | None:
        """429 when a new stream would wait behind `max_queue` others: the
        router tries another node, or tells the client when to retry."""
        q, cap = self.queue_state(), self.worker.max_streams
        if cap is None or q["streams"] + q["queued"] < cap + self.max_queue:
            return None
        err = wire.WireError(429, "overloaded", f"node {self.name} is at its limit: {q['streams']} streams "
                                                f"decoding (max {cap}), {q['queued']} waiting (max {self.max_queue})")
        err.retry_after = RETRY_AFTER_S
        return err

    async def _op_prefill(self, body: dict, src: str) -> dict:
        """One worker job per paced piece: streams decode between them (a long prompt never holds the engine)."""
        sid, prompt = body["session"], body["prompt"]
        while await self.worker.call(self.engine.prefill, sid, prompt, True):
            pass
        self._touch(sid, src)
        self._changed()
        return {"session": sid, "prompt_tokens": len(prompt)}

    async def _op_close(self, body: dict, src: str) -> dict:
        """Answered at once: a busy engine closes it after its current step
        (a control answer never waits behind compute; `deferred`)."""
        sid = body["session"]
        known = self.sessions.pop(sid, None) is not None
        job = asyncio.ensure_future(self.worker.call(self.engine.close_session, sid))
        self._changed()
        if not self.worker.idle:
            job.add_done_callback(_quiet)
            return {"closed": known, "deferred": True}
        return {"closed": bool(await job) or known}

    async def _op_adopt(self, body: dict, src: str) -> dict:
        """A Mac joined: the same model under a new manifest, this node's part unchanged (`mlxmoe up`)."""
        mh = await self.worker.call(self.engine.adopt, body["manifest"])
        self.identity = engine_identity(self.engine)
        await self.worker.call(self.worker.refresh_snapshot)
        self._changed()  # Bonjour TXT: the new hash
        log.info("node %s serves manifest %s now", self.name, mh)
        return {"manifest_hash": mh}

    async def _op_export_session(self, body: dict, src: str) -> dict:
        return await self.worker.call(self.engine.export_session, body["session"])

    async def _op_import_session(self, body: dict, src: str) -> dict:
        sid = await self.worker.call(self.engine.import_session, body["state"])
        self._touch(sid, src)
        self._changed()
        return {"session": sid}

    # ---- session expiry (docs/SECURITY.md: nodes expire idle sessions and close the ones their router forgets)
    def _touch(self, sid: str, src: str) -> None:
        self.sessions[sid] = (src, time.time())

    async def _close_all(self, sids: list[str]) -> None:
        for sid in sids:
            self.sessions.pop(sid, None)
            try:
                await self.worker.call(self.engine.close_session, sid)
            except Exception:  # best effort: the engine may have evicted it already
                log.exception("closing expired session %s failed", sid)
        if sids:
            self._changed()

    async def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle longer than the TTL (a router restart, a lost close)."""
        gone = expired_sessions(self.sessions, self._busy, now or time.time(), self.session_ttl)
        await self._close_all(gone)
        return gone

    async def close_unheld(self, src: str, held: set[str], now: float | None = None) -> list[str]:
        """`src` says which sessions it holds here: close its other idle ones."""
        gone = unheld_sessions(self.sessions, self._busy, src, held, now or time.time(), HELD_GRACE_S)
        await self._close_all(gone)
        return gone

    async def _op_experts(self, body: dict, src: str) -> dict:
        layer, x = body["layer"], body["x"]
        spec = self._experts_spec
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
        if self.unavailable:
            raise wire.WireError(503, "engine_unavailable", f"node {self.name} cannot generate: {self.unavailable}")
        full = self.overloaded()
        if full is not None:
            raise full
        await asyncio.to_thread(self.engine.prepare, params)  # a grammar compiles here, not on the engine thread
        stream = self.worker.stream(lambda: self.engine.generate(sid, prompt, params))
        self.active += 1
        self._busy[sid] = self._busy.get(sid, 0) + 1
        self._touch(sid, req.src)
        self._changed()
        try:
            return await self._pump(request, req, stream, len(prompt))
        finally:
            stream.cancel()
            self.active -= 1
            self._busy[sid] -= 1
            if not self._busy[sid]:
                del self._busy[sid]
            if sid in self.sessions:
                self._touch(sid, self.sessions[sid][0])
            self._changed()

    async def _pump(self, request, req, stream, n_prompt) -> web.StreamResponse:
        t_start = time.time()
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
        signer = wire.StreamSigner(self.key, req.nonce)
        n, finish, t_first = 0, None, time.time()
        line = request.setdefault(ACCESS, {})
        line.update(prompt_tokens=n_prompt, completion_tokens=0, ttft_s=round(t_first - t_start, 4))
        try:
            ev = first
            while ev is not None:
                n += 1
                line.update(completion_tokens=n, tok_s=tok_s(n, t_first, time.time()))
                finish = ev.finish_reason
                await self._write(resp, signer, token_frame(ev))
                ev = await _next_or_none(it)
            await self._write(resp, signer, {"t": "end", "prompt_tokens": n_prompt, "completion_tokens": n,
                                     "finish_reason": finish or "length"})
            line["finish_reason"] = finish or "length"
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the router went away; `finally` in _generate cancels the stream
        except Exception as e:
            err = self._engine_error(e, "generate")
            await self._write(resp, signer, {"t": "err", "status": err.status, "code": err.code, "message": err.message})
        await resp.write_eof()
        return resp

    async def _write(self, resp: web.StreamResponse, signer: wire.StreamSigner, frame: dict) -> None:
        data = signer.frame(frame)
        self.bytes_out += len(data)
        await resp.write(data)


def _quiet(task: asyncio.Future) -> None:
    """A background job's error is logged, not raised into the void."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("background engine job failed: %s", task.exception())


def self_check(engine: Engine) -> str | None:
    """Worker thread: one short greedy generation, as a chat runs it (a real
    node prefills the first token into its KV cache and decodes the second on
    it). Why the engine cannot generate (a node that cannot is not up), or None."""
    sid = SELF_CHECK
    try:
        for _ in engine.generate(sid, [0, 0], GenParams(max_tokens=1)):
            pass
    except MlxMoeError:  # a clear, passing condition (the KV budget is full right now): it can generate
        pass
    except Exception as e:
        log.debug("self check failed", exc_info=True)
        return f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        try:
            engine.close_session(sid)
        except Exception:
            pass
    return None


def token_frame(ev: TokenEvent) -> dict:
    """A TokenEvent as its "tok" frame; "piece": the token's own text; "top": the alternatives
    [{token, text, logprob}], when asked for."""
    f = {"t": "tok", "token": int(ev.token), "text": ev.text, "logprob": float(ev.logprob),
         "finish_reason": ev.finish_reason}
    if ev.piece is not None:
        f["piece"] = str(ev.piece)
    if ev.top_logprobs:
        f["top"] = [{"token": int(t["token"]), "text": str(t["text"]), "logprob": float(t["logprob"])}
                    for t in ev.top_logprobs]
    return f


def expired_sessions(sessions: dict, busy: dict, now: float, ttl: float) -> list[str]:
    """Ids idle (not streaming) for longer than `ttl` seconds."""
    return [sid for sid, (_, last) in sessions.items() if sid not in busy and now - last > ttl]


def unheld_sessions(sessions: dict, busy: dict, src: str, held: set, now: float, grace: float) -> list[str]:
    """Ids `src` made here but no longer holds, idle for longer than `grace`
    (so a session it is opening right now, after it listed the others, stays)."""
    return [sid for sid, (owner, last) in sessions.items()
            if owner == src and sid not in held and sid not in busy and now - last > grace]


async def _expire_every(server: NodeServer) -> None:
    while True:
        await asyncio.sleep(min(60.0, max(0.05, server.session_ttl / 4)))
        try:
            await server.expire_idle()
        except Exception:  # never let the loop die
            log.exception("session expiry")


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

    def __init__(self, server: NodeServer, runner: web.AppRunner, host: str, port: int, advertiser=None,
                 tls: bool = False):
        self.server, self.runner, self.host, self.port, self.advertiser = server, runner, host, port, advertiser
        self.tls = tls
        self.expirer: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def stop(self) -> None:
        if self.expirer is not None:
            self.expirer.cancel()
        if self.server.refresher is not None:
            self.server.refresher.cancel()
        if self.advertiser is not None:
            await self.advertiser.stop()
        await self.runner.cleanup()
        self.server.worker.stop()

    async def kill(self) -> None:
        """Vanish like a crashed Mac: no goodbye, connections dropped."""
        self.server.abort_connections()
        if self.expirer is not None:
            self.expirer.cancel()
        if self.server.refresher is not None:
            self.server.refresher.cancel()
        if self.advertiser is not None and self.advertiser.azc is not None:
            await self.advertiser.azc.async_close()  # no unregister: peers see it only via probes
            self.advertiser.azc = None
        await self.runner.cleanup()
        self.server.worker.stop()


async def start_node(engine: Engine | None, key: bytes, host: str = "0.0.0.0", port: int = 0, advertise: bool = True,
                     interface: str | None = None, identity: dict | None = None,
                     name: str | None = None, factory: Callable | None = None,
                     max_streams: int | None = MAX_STREAMS, max_queue: int = MAX_QUEUE, tls=None,
                     session_ttl: float = SESSION_TTL_S, keepalive_timeout: float = KEEPALIVE_S,
                     max_connections: int = MAX_CONNECTIONS) -> RunningNode:
    """Start serving `engine` (or the engine `factory()` builds on the engine thread).
    `tls` (a cluster.tls.Identity): serve mutual TLS only, and sign this
    node's calls to peers with the same certificate; None: plain HTTP (tests,
    --insecure-plain-http)."""
    from mlxmoe.cluster.discovery import Advertiser, txt_props
    from mlxmoe.cluster import tls as cluster_tls
    from mlxmoe.node.remote import peers

    ssl_context = None
    if tls is not None:
        ssl_context = cluster_tls.server_context(tls)
        peers.set_client_context(cluster_tls.client_context(tls))  # one identity per process

    server = NodeServer(engine, key, identity, factory, max_streams, max_queue)
    server.session_ttl = float(session_ttl)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0,
                           keepalive_timeout=keepalive_timeout, **HTTP_LIMITS)
    try:
        ident = await server.init_identity()
        await runner.setup()
        site = GuardedSite(runner, host, port, ssl_context=ssl_context, name="node",
                           limits=Limits(max_connections=max_connections))
        await site.start()
    except BaseException:  # the bundle fails to load, the port is taken: no engine thread may outlive us
        await runner.cleanup()  # (MLX aborts at exit if one does)
        server.worker.stop()
        await asyncio.to_thread(server.worker.join, 10)
        raise
    port = runner.addresses[0][1]
    server.name = name or default_name(ident["groups"], port)  # the site is up: its answers name it from now on
    adv = None
    if advertise:
        props = lambda: txt_props(server.identity, server.stats(), tls=tls is not None)  # (adopt changes it)
        adv = Advertiser(port, props(), interface=interface, host_ip=host, name=server.name)
        server.on_change = lambda: adv.update(props())  # before registering: an adopt meanwhile is not lost
        await adv.start()
        server.name = adv.name  # Bonjour may have renamed it (another service had the name)
        server.refresher = asyncio.ensure_future(_refresh_every(server, TXT_REFRESH_S))
    node = RunningNode(server, runner, host, port, adv, tls=tls is not None)
    node.expirer = asyncio.ensure_future(_expire_every(server))
    return node


async def serve_node(engine: Engine | None, key: bytes, host: str = "0.0.0.0", port: int = 0, advertise: bool = True,
                     interface: str | None = None, ready: Callable[[RunningNode], None] | None = None,
                     factory: Callable | None = None, tls=None, session_ttl: float = SESSION_TTL_S,
                     max_streams: int | None = MAX_STREAMS, max_queue: int = MAX_QUEUE) -> None:
    """Run a node until SIGINT/SIGTERM."""
    from mlxmoe.cluster.worker import until_signalled

    node = await start_node(engine, key, host, port, advertise, interface, factory=factory, tls=tls,
                            session_ttl=session_ttl, max_streams=max_streams, max_queue=max_queue)
    ident = node.server.identity
    print(f"mlxmoe node: {ident['model']} groups {ident['groups']} (manifest {ident['manifest_hash'][:12]}) "
          f"serving on {node.url}" + (f", advertised as {node.advertiser.name}" if node.advertiser else
                                       ", not advertised (list it in the router's --peers file)"), flush=True)
    if ready:
        ready(node)
    await until_signalled()
    await node.stop()
