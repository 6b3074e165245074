"""The router: places each new conversation on the node whose expert group
fits it best, pins it there, streams tokens back, and re-places it if that
node goes away.

Placement: the trunk front end scores every group once per new conversation
(S(g), DESIGN.md); candidates are live nodes ordered by their best group's
rank (groups within `tie_margin` of the best count as tied), then by load.
A node that answers 503 (KV budget full) is skipped for its Retry-After.

Pinning: a conversation is found again by the client's session id (header
X-Session-Id, or `session_id`/`user` in the body), or by the hash of its
messages before the last user turn (registered after each completed turn).

Failover: when the node fails mid-stream, the turn continues on the next
candidate from the transcript (prompt + tokens already sent), with the
remaining max_tokens, so the client sees every token exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp

from .client import NodeClient
from .discovery import Browser, Peer, PeerTable
from .errors import RpcError
from .worker import EngineWorker

log = logging.getLogger("mlxmoe.router")


class Rejected(Exception):
    """No node can take the request now: HTTP status + Retry-After seconds."""

    def __init__(self, status: int, message: str, retry_after: float):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class Session:
    id: str
    scores: dict[int, float]
    ranked: list[int]
    margin: float
    peer: str | None = None  # pinned node (Peer.name)
    group: int | None = None
    turns: int = 0
    tokens: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    ephemeral: bool = False
    keys: list[str] = field(default_factory=list)  # hints and prefix hashes that lead here
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def status(self) -> dict:
        return {"id": self.id, "node": self.peer, "group": self.group,
                "scores": {str(g): s for g, s in self.scores.items()}, "margin": self.margin,
                "mode": "pinned", "turns": self.turns, "tokens": self.tokens,
                "created": self.created, "last_used": self.last_used}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def prefix_key(messages: list[dict]) -> str:
    canon = [[m.get("role"), _text(m.get("content"))] for m in messages]
    return "p:" + hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()


def before_last_user(messages: list[dict]) -> list[dict] | None:
    """Messages before the last user turn, or None if there is no earlier
    assistant turn (a first turn never matches an existing session)."""
    idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if idx is None:
        return None
    head = messages[:idx]
    return head if any(m.get("role") == "assistant" for m in head) else None


class Router:
    def __init__(self, frontend: Any, key: bytes, *, frontend_factory: Any = None,
                 static_peers: list[str] = (), mdns: bool = True,
                 interface: str | None = None, probe_interval: float = 2.0, token_timeout: float = 60.0,
                 first_token_timeout: float = 300.0, tie_margin: float = 0.02, session_ttl: float = 1800.0,
                 max_failovers: int = 3):
        # frontend_factory() runs on the frontend's thread (MLX streams are per thread)
        self.frontend, self.key, self.frontend_factory = frontend, key, frontend_factory
        self.model, self.manifest_hash, self.n_groups = "", "", 0
        self.peers = PeerTable(self.manifest_hash, self.n_groups, self.model)
        if frontend is not None:
            self._bind(frontend)
        for url in static_peers:
            self.peers.add_static(url)
        self.mdns, self.interface = mdns, interface
        self.probe_interval, self.token_timeout = probe_interval, token_timeout
        self.first_token_timeout, self.tie_margin = first_token_timeout, tie_margin
        self.session_ttl, self.max_failovers = session_ttl, max_failovers
        self.sessions: dict[str, Session] = {}
        self.index: dict[str, str] = {}  # hint / prefix hash -> session id
        self.last_placement: dict | None = None
        self.counters = {"requests": 0, "failovers": 0, "rejected": 0}
        self.tokens_streamed = 0
        self.started = time.time()
        self.worker = EngineWorker("mlxmoe-frontend")
        self.http: aiohttp.ClientSession | None = None
        self.clients: dict[str, NodeClient] = {}
        self.browser: Browser | None = None
        self._busy_until: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._probe_task: asyncio.Task | None = None

    def _bind(self, frontend: Any) -> None:
        self.frontend = frontend
        man = frontend.manifest
        self.model, self.manifest_hash, self.n_groups = man.model_id, man.hash, man.n_groups
        self.peers.manifest_hash, self.peers.n_groups, self.peers.model = man.hash, man.n_groups, man.model_id

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.frontend is None:
            self._bind(await self.worker.call(self.frontend_factory))
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        if self.mdns:
            self.browser = Browser(self._on_mdns, self.interface)
            await self.browser.start()
        await self.probe_all()
        self._probe_task = asyncio.ensure_future(self._probe_loop())

    async def stop(self) -> None:
        if self._probe_task:
            self._probe_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self.browser:
            await self.browser.stop()
        if self.http:
            await self.http.close()
        self.worker.stop()

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- peers
    def client(self, p: Peer) -> NodeClient:
        c = self.clients.get(p.url)
        if c is None:
            c = self.clients[p.url] = NodeClient(self.http, p.url, self.key, self.manifest_hash, p.name)
        c.name = p.name
        return c

    def _on_mdns(self, name: str, rec: dict | None) -> None:
        self.peers.from_mdns(name, rec)
        p = self.peers.peers.get(name)
        if rec is not None and p is not None and p.state != "ignored":
            self._spawn(self.probe(p))  # verify it holds the key before using it

    async def probe(self, p: Peer) -> None:
        try:
            info = await self.client(p).call("info", timeout=max(2.0, self.probe_interval * 2))
        except RpcError as e:
            if e.code == "manifest_mismatch":
                self.peers._set(p, "ignored", e.message)
            elif p.state == "up" or (p.state == "down" and p.reason == "not probed yet"):
                self.peers.mark_down(p, f"info probe failed: {e.message}")  # keep an earlier, better reason
            return
        self.peers.from_info(p, info)

    async def probe_all(self) -> None:
        now = time.time()
        for name, p in list(self.peers.peers.items()):  # forget Bonjour peers gone for 10 minutes
            if p.source == "mdns" and p.state != "up" and now - p.last_seen > 600:
                del self.peers.peers[name]
        peers = [p for p in self.peers.peers.values()]
        if peers:
            await asyncio.gather(*(self.probe(p) for p in peers))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe_all()
                await self._expire_sessions()
            except Exception:  # never let the loop die
                log.exception("probe loop")

    async def _expire_sessions(self) -> None:
        now = time.time()
        for s in [s for s in self.sessions.values() if now - s.last_used > self.session_ttl and not s.lock.locked()]:
            self.forget(s)
            self._spawn(self._close_on_node(s.id, s.peer))

    async def _close_on_node(self, sid: str, peer_name: str | None) -> None:
        p = self.peers.peers.get(peer_name) if peer_name else None
        if p is not None and p.state == "up":
            try:
                await self.client(p).call("close", {"session": sid}, timeout=10)
            except RpcError:
                pass

    def forget(self, s: Session) -> None:
        self.sessions.pop(s.id, None)
        for k in s.keys:
            if self.index.get(k) == s.id:
                del self.index[k]

    # ---------------------------------------------------------------- placement
    def candidates(self, s: Session, exclude: set[str] = frozenset()) -> list[Peer]:
        """Live peers for this session, best first: the pinned node, then by
        the rank of the peer's best group (ties within tie_margin merged),
        then least loaded; nodes that just said "full" go last."""
        now = time.time()
        best = s.scores[s.ranked[0]]

        def group_of(p: Peer) -> int:
            return min(p.groups, key=lambda g: s.ranked.index(g) if g in s.ranked else len(s.ranked))

        def bucket(p: Peer) -> int:
            g = group_of(p)
            if g not in s.scores:
                return len(s.ranked)
            return 0 if best - s.scores[g] <= self.tie_margin else s.ranked.index(g)

        peers = [p for p in self.peers.live() if p.name not in exclude]
        peers.sort(key=lambda p: (p.name != s.peer, self._busy_until.get(p.name, 0) > now, bucket(p), p.load))
        return peers

    def group_for(self, s: Session, p: Peer) -> int:
        return min(p.groups, key=lambda g: s.ranked.index(g) if g in s.ranked else len(s.ranked))

    async def _score(self, tokens: list[int]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        sc = await self.worker.call(self.frontend.score, tokens)
        return sc, getattr(sc, "elapsed_ms", 0.0) or (time.perf_counter() - t0) * 1000

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self.worker.call(self.frontend.encode_chat, messages)

    async def encode(self, text: str) -> list[int]:
        return await self.worker.call(self.frontend.encode, text)

    async def session_for(self, tokens: list[int], hint: str | None = None,
                          messages: list[dict] | None = None) -> Session:
        """The existing session this request continues, or a new one placed now."""
        sid = None
        if hint:
            sid = hint if hint in self.sessions else self.index.get("h:" + hint)
        elif messages is not None:
            head = before_last_user(messages)
            if head is not None:
                sid = self.index.get(prefix_key(head))
        if sid is not None and sid in self.sessions:
            return self.sessions[sid]
        sc, ms = await self._score(tokens)
        s = Session(id="s-" + os.urandom(8).hex(), scores=dict(sc.scores), ranked=list(sc.ranked),
                    margin=float(sc.margin), ephemeral=hint is None and messages is None)
        if hint:
            s.keys.append("h:" + hint)
            self.index["h:" + hint] = s.id
        self.sessions[s.id] = s
        self.last_placement = {"session": s.id, "scores": {str(g): v for g, v in sc.scores.items()},
                               "margin": float(sc.margin), "best": int(sc.best), "layers": list(sc.layers),
                               "elapsed_ms": ms}
        return s

    def remember_turn(self, s: Session, messages: list[dict], reply: str) -> None:
        """After a completed chat turn: the next turn's prefix leads here."""
        k = prefix_key(messages + [{"role": "assistant", "content": reply}])
        self.index[k] = s.id
        s.keys.append(k)

    # ---------------------------------------------------------------- turns
    async def open_turn(self, s: Session, prompt: list[int], params: dict) -> "Turn":
        """Connect the turn to a node (pinned one first). Raises Rejected when
        no node can take it, RpcError for a request the node refuses (4xx)."""
        await s.lock.acquire()
        turn = Turn(self, s, prompt, params)
        try:
            await turn.connect(first=True)
        except BaseException:
            s.lock.release()
            raise
        return turn

    def headers(self, s: Session) -> dict:
        return {"X-MLXMoE-Session": s.id, "X-MLXMoE-Node": s.peer or "", "X-MLXMoE-Group": str(s.group),
                "X-MLXMoE-Margin": f"{s.margin:.4f}",
                "X-MLXMoE-Scores": json.dumps({str(g): round(v, 4) for g, v in s.scores.items()})}

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        return {"model": self.model, "manifest_hash": self.manifest_hash, "uptime_s": time.time() - self.started,
                "peers": self.peers.status(),
                "sessions": [s.status() for s in sorted(self.sessions.values(), key=lambda s: s.created)
                             if not s.ephemeral],
                "last_placement": self.last_placement, "counters": dict(self.counters)}

    def traffic(self) -> dict:
        return {"bytes_out": sum(c.bytes_out for c in self.clients.values()),
                "bytes_in": sum(c.bytes_in for c in self.clients.values()),
                "tokens": self.tokens_streamed}


class Turn:
    """One request's generation, possibly spanning nodes after failovers."""

    def __init__(self, router: Router, s: Session, prompt: list[int], params: dict):
        self.r, self.s, self.prompt, self.params = router, s, list(prompt), dict(params)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.tried: set[str] = set()
        self.failovers = 0
        self._frames: AsyncIterator[dict] | None = None
        self._first: dict | None = None
        self._closed = False

    async def connect(self, first: bool = False) -> None:
        r, s = self.r, self.s
        remaining = self.params["max_tokens"] - len(self.generated)
        params = {**self.params, "max_tokens": remaining}
        prompt = self.prompt + self.generated
        retry_after, last_err = None, None
        for p in r.candidates(s, self.tried):
            self.tried.add(p.name)
            frames = r.client(p).generate(s.id, prompt, params, token_timeout=r.token_timeout)
            try:
                first_frame = await asyncio.wait_for(frames.__anext__(), r.first_token_timeout)
            except StopAsyncIteration:
                first_frame = None
            except asyncio.TimeoutError:
                await frames.aclose()
                r.peers.mark_down(p, f"no first token within {r.first_token_timeout:.0f}s")
                continue
            except RpcError as e:
                await frames.aclose()
                last_err = e
                if e.status in (429, 503):
                    r._busy_until[p.name] = time.time() + (e.retry_after or 2)
                    retry_after = min(retry_after or 1e9, e.retry_after or 2)
                    continue
                if e.retryable:
                    if e.code in ("unreachable", "disconnected", "timeout"):
                        r.peers.mark_down(p, e.message)
                    continue
                raise  # the request itself is bad (e.g. context overflow): same on every node
            moved = s.peer is not None and s.peer != p.name
            if moved or not first:
                self.failovers += 1
                r.counters["failovers"] += 1
                log.warning("session %s moved from %s to %s (%s)", s.id, s.peer, p.name,
                            last_err.message if last_err else "pinned node not available")
            if s.peer != p.name:
                p.active_sessions += 1  # until the next probe says better: spreads quick placements
            s.peer, s.group = p.name, r.group_for(s, p)
            self._frames, self._first = frames, first_frame
            return
        r.counters["rejected"] += 1
        if retry_after is not None:
            raise Rejected(429, "every node that could serve this conversation is full; retry shortly",
                           retry_after)
        if last_err is not None and not first:
            raise last_err
        raise Rejected(503, "no node is up to serve this conversation"
                       + (f" (last error: {last_err.message})" if last_err else
                          ": start `mlxmoe node` on your Macs (or list them in --peers)"), 5)

    async def events(self) -> AsyncIterator[dict]:
        """Token frames {"token","text","logprob","finish_reason"} across failovers."""
        try:
            while True:
                try:
                    async for f in self._iter():
                        if f["t"] == "end":
                            self.finish_reason = f.get("finish_reason") or self.finish_reason or "length"
                            return
                        self.generated.append(int(f["token"]))
                        self.r.tokens_streamed += 1
                        self.finish_reason = f.get("finish_reason")
                        yield f
                    return
                except RpcError as e:
                    if not e.retryable or self.failovers >= self.r.max_failovers:
                        raise
                    if e.code in ("unreachable", "disconnected", "timeout"):
                        p = self.r.peers.peers.get(self.s.peer)
                        if p is not None:
                            self.r.peers.mark_down(p, e.message)
                    if len(self.generated) >= self.params["max_tokens"] or self.finish_reason:
                        self.finish_reason = self.finish_reason or "length"
                        return  # the node died after its last token: nothing left to do
                    await self._close_frames()
                    try:
                        await self.connect()
                    except Rejected as rej:
                        raise RpcError(503, "failover_failed", f"node failed mid-stream ({e.message}) and no "
                                       f"other node could continue: {rej.message}") from None
        finally:
            await self.close()

    async def _iter(self) -> AsyncIterator[dict]:
        if self._first is not None:
            f, self._first = self._first, None
            yield f
            if f["t"] == "end":
                return
        async for f in self._frames:
            yield f

    async def _close_frames(self) -> None:
        if self._frames is not None:
            try:
                await self._frames.aclose()
            except Exception:
                pass
            self._frames = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close_frames()
        s = self.s
        s.turns += 1
        s.tokens = len(self.prompt) + len(self.generated)
        s.last_used = time.time()
        if s.lock.locked():
            s.lock.release()
        if s.ephemeral:
            self.r.forget(s)
            self.r._spawn(self.r._close_on_node(s.id, s.peer))
