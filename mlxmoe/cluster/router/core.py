"""The Router: peers (mDNS and static, probed every `probe_interval`), the
session index, and the turns it opens; placement decisions come from
placement.py, migration from migration.py, race from race.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import aiohttp

from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.discovery import Browser, Peer, PeerTable
from mlxmoe.cluster.mobility import Mobility
from mlxmoe.cluster.router import migration, placement
from mlxmoe.cluster.router.sessions import Session, SessionIndex
from mlxmoe.cluster.router.turn import Rejected, Turn
from mlxmoe.cluster.worker import EngineWorker
from mlxmoe.errors import RpcError
from mlxmoe.modes import MIGRATING, PER_LAYER

log = logging.getLogger("mlxmoe.router")
COUNTERS = ("requests", "failovers", "rejected", "migrations", "races")


class Router:
    def __init__(self, frontend: Any, key: bytes, *, frontend_factory: Any = None,
                 static_peers: list[str] = (), mdns: bool = True,
                 interface: str | None = None, probe_interval: float = 2.0, token_timeout: float = 60.0,
                 first_token_timeout: float = 300.0, tie_margin: float = 0.02, session_ttl: float = 1800.0,
                 max_failovers: int = 3, mobility: Mobility | dict | None = None):
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
        self.mob = mobility if isinstance(mobility, Mobility) else Mobility.from_dict(mobility or {})
        self.sessions = SessionIndex()
        self.last_placement: dict | None = None
        self.counters = dict.fromkeys(COUNTERS, 0)  # read-only outside: count() bumps them
        self.tokens_streamed = 0
        self.started = time.time()
        self.worker = EngineWorker("mlxmoe-frontend")
        self.http: aiohttp.ClientSession | None = None
        self.clients: dict[str, NodeClient] = {}
        self.browser: Browser | None = None
        self.busy_until: dict[str, float] = {}  # node name -> until when it said "full" (429/503)
        self._tasks: set[asyncio.Task] = set()
        self._probe_task: asyncio.Task | None = None
        self._key_warned: set[str] = set()  # peer URLs already logged as refusing our key

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
        self._spawn(self._warn_if_alone())
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

    def count(self, name: str) -> None:
        self.counters[name] += 1

    def count_token(self) -> None:
        self.tokens_streamed += 1

    def mark_busy(self, p: Peer, retry_after: float | None) -> None:
        """`p` said "full": it goes last among candidates for Retry-After seconds (2 if none)."""
        self.busy_until[p.name] = time.time() + (retry_after or 2)

    # ---------------------------------------------------------------- peers
    def client(self, p: Peer) -> NodeClient:
        c = self.clients.get(p.url)
        if c is None:
            c = self.clients[p.url] = NodeClient(self.http, p.url, self.key, self.manifest_hash, p.name)
        c.name = p.name
        return c

    def peer(self, name: str | None) -> Peer | None:
        """A peer by its name (static peers are keyed by URL until their info names them)."""
        if name is None:
            return None
        p = self.peers.peers.get(name)
        return p if p is not None else next((q for q in self.peers.peers.values() if q.name == name), None)

    def _on_mdns(self, name: str, rec: dict | None) -> None:
        self.peers.from_mdns(name, rec)
        p = self.peers.peers.get(name)
        if rec is not None and p is not None and p.state != "ignored":
            self._spawn(self.probe(p))  # verify it holds the key before using it

    async def probe(self, p: Peer) -> None:
        try:
            info = await self.client(p).call("info", timeout=max(2.0, self.probe_interval * 2))
        except RpcError as e:
            self._log_key_refusal(p, e)
            if e.code == "manifest_mismatch":
                self.peers._set(p, "ignored", e.message)
            elif p.state == "up" or (p.state == "down" and p.reason == "not probed yet"):
                self.peers.mark_down(p, f"info probe failed: {e.message}")  # keep an earlier, better reason
            return
        self.peers.from_info(p, info)
        self._harvest(p, info)

    def _log_key_refusal(self, p: Peer, e: RpcError) -> None:
        """A peer with another cluster key is only `down` in /status: say it in
        the log too, once per peer."""
        if (e.status == 401 or e.code in ("unauthorized", "unauthenticated")) and p.url not in self._key_warned:
            self._key_warned.add(p.url)
            log.warning("peer %s (%s) refuses our cluster key or answers with another: %s", p.name, p.url, e.message)

    async def _warn_if_alone(self, browse_s: float = 5.0) -> None:
        """After the first probe round (with Bonjour, a few seconds of browsing
        later) warn when no node is up, naming the peers tried."""
        if self.mdns:
            await asyncio.sleep(browse_s)
        if self.peers.live():
            return
        tried = [f"{p.url} ({p.reason or p.state})" for p in self.peers.peers.values()]
        where = ("tried " + "; ".join(tried)) if tried else (
            "no peers listed" + (" and none found over Bonjour" if self.mdns else " (--peers) and Bonjour is off"))
        log.warning("no node is up: %s. Chats fail until one is; start `mlxmoe node BUNDLE --group N`", where)

    def _harvest(self, p: Peer, info: dict) -> None:
        """Per-session remote-call counters from a node's info (mode != pin)."""
        stats = info.get("session_stats")
        if not isinstance(stats, dict):
            return
        for sid, st in stats.items():
            s = self.sessions.get(sid)
            if s is not None and isinstance(st, dict):
                s.remote[p.name] = {k: st.get(k) for k in ("routing", "remote_calls", "remote_bytes", "remote_s")}

    async def refresh_remote(self, timeout: float = 2.0) -> None:
        """Fresh remote-call counts for the status page: probe the nodes that
        hold sessions routed beyond themselves."""
        names = {s.peer for s in self.sessions if s.routing != "local" or s.remote}
        peers = [p for p in self.peers.live() if p.name in names]
        if peers:
            try:
                await asyncio.wait_for(asyncio.gather(*(self.probe(p) for p in peers)), timeout)
            except asyncio.TimeoutError:
                pass

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
                self._expire_sessions()
            except Exception:  # never let the loop die
                log.exception("probe loop")

    def _expire_sessions(self) -> None:
        for s in self.sessions.expired(time.time(), self.session_ttl):
            self.forget(s)
            self.close_later(s.id, s.peer)

    def close_later(self, sid: str, peer_name: str | None) -> None:
        """Close the session's copy on that node, in the background (best effort)."""
        self._spawn(self._close_on_node(sid, peer_name))

    async def _close_on_node(self, sid: str, peer_name: str | None) -> None:
        p = self.peer(peer_name)
        if p is not None and p.state == "up":
            try:
                await self.client(p).call("close", {"session": sid}, timeout=10)
            except RpcError:
                pass

    def forget(self, s: Session) -> None:
        self.sessions.forget(s)

    # ---------------------------------------------------------------- placement
    def candidates(self, s: Session, exclude: set[str] = frozenset()) -> list[Peer]:
        """Live peers for this session, best first (placement.rank_candidates)."""
        return placement.rank_candidates(self.peers.live(), s.scores, s.ranked, self.tie_margin, self.busy_until,
                                         time.time(), pinned=s.peer, exclude=exclude)

    def group_for(self, s: Session, p: Peer) -> int:
        return placement.group_for(s.ranked, p.groups)

    def race_candidates(self, s: Session) -> list[Peer]:
        """The best live node of each of the best-scoring groups (distinct groups)."""
        return placement.race_candidates(self.candidates(s), s.ranked, self.mob.race_candidates)

    def group_urls(self, skip: Peer | None = None) -> dict[str, str]:
        """str(group) -> URL of the least loaded live node serving it (not `skip`)."""
        return placement.group_urls(self.peers.live(), self.busy_until, time.time(),
                                    skip=None if skip is None else skip.name)

    def destinations(self, group: int, skip: str | None = None) -> list[Peer]:
        """Live nodes serving `group`, best first (not the one named `skip`)."""
        return placement.destinations(self.peers.live(), group, self.busy_until, time.time(), skip=skip)

    def node_params(self, s: Session, p: Peer, params: dict) -> dict:
        """Generate params for `s` on `p`: the mode's routing fields (none for
        strictly local decode, so nodes without remote calls still serve pin)."""
        if s.mode in PER_LAYER:
            return {**params, "routing": s.mode, "peers": placement.remote_peers(self.group_urls(skip=p), p.groups)}
        eg = s.expert_group
        if eg is not None and eg not in p.groups:
            url = self.group_urls(skip=p).get(str(eg))
            if url is not None:
                return {**params, "routing": "group", "expert_group": eg, "peers": {str(eg): url}}
            log.warning("session %s: no live node serves expert group %s; decoding locally", s.id, eg)
        return params

    # ---------------------------------------------------------------- sessions
    async def score(self, tokens: list[int]) -> tuple[Any, float]:
        """S(g) of `tokens` on the trunk front end: (PlacementScores, ms)."""
        t0 = time.perf_counter()
        sc = await self.worker.call(self.frontend.score, tokens)
        return sc, getattr(sc, "elapsed_ms", 0.0) or (time.perf_counter() - t0) * 1000

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self.worker.call(self.frontend.encode_chat, messages)

    async def encode(self, text: str) -> list[int]:
        return await self.worker.call(self.frontend.encode, text)

    async def session_for(self, tokens: list[int], hint: str | None = None,
                          messages: list[dict] | None = None, mode: str | None = None) -> Session:
        """The existing session this request continues, or a new one placed now.
        `mode` (None: the session's own, or the router's default for a new one)."""
        s = self.sessions.find(hint, messages)
        if s is not None:
            if mode is not None and mode != s.mode:
                s.set_mode(mode)
            return s
        sc, ms = await self.score(tokens)
        s = Session(id="s-" + os.urandom(8).hex(), scores=dict(sc.scores), ranked=list(sc.ranked),
                    margin=float(sc.margin), ephemeral=hint is None and messages is None,
                    mode=mode or self.mob.mode)
        self.sessions.add(s, hint)
        self.last_placement = {"session": s.id, "scores": {str(g): v for g, v in sc.scores.items()},
                               "margin": float(sc.margin), "best": int(sc.best), "layers": list(sc.layers),
                               "elapsed_ms": ms}
        return s

    def remember_turn(self, s: Session, messages: list[dict], reply: str) -> None:
        """After a completed chat turn: the next turn's prefix leads here."""
        self.sessions.remember_turn(s, messages, reply)

    # ---------------------------------------------------------------- turns
    async def open_turn(self, s: Session, prompt: list[int], params: dict) -> Turn:
        """Count the request and connect its turn to a node (pinned one first).
        Raises Rejected when no node can take it, RpcError for a request the
        node refuses (4xx); a session that never ran a turn is then forgotten."""
        self.count("requests")
        await s.lock.acquire()
        turn = Turn(self, s, prompt, params)
        try:
            if s.turns > 0 and s.mode in MIGRATING:
                await migration.recheck(self, s, prompt, "turn")
            if s.mode == "race" and s.turns == 0 and s.peer is None:
                await turn.race()
            if not turn.done:
                await turn.connect(first=True)
        except BaseException as e:
            s.lock.release()
            if isinstance(e, (Rejected, RpcError)) and not s.placed:
                self.forget(s)
            raise
        return turn

    def end_turn(self, s: Session, context: list[int]) -> None:
        """A turn is over (Turn.close): update the session; an ephemeral one
        (no hint, no messages: /v1/completions) is forgotten and closed."""
        s.end_turn(context)
        if s.ephemeral:
            self.forget(s)
            self.close_later(s.id, s.peer)

    def headers(self, s: Session) -> dict:
        return {"X-MLXMoE-Session": s.id, "X-MLXMoE-Node": s.peer or "", "X-MLXMoE-Group": str(s.group),
                "X-MLXMoE-Mode": s.mode,
                "X-MLXMoE-Margin": f"{s.margin:.4f}",
                "X-MLXMoE-Scores": json.dumps({str(g): round(v, 4) for g, v in s.scores.items()})}

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        return {"model": self.model, "manifest_hash": self.manifest_hash, "uptime_s": time.time() - self.started,
                "peers": self.peers.status(),
                "sessions": [s.status() for s in sorted(self.sessions, key=lambda s: s.created)
                             if not s.ephemeral],
                "last_placement": self.last_placement, "counters": dict(self.counters),
                "mobility": self.mob.to_dict(), "traffic": self.traffic()}

    def traffic(self) -> dict:
        return {"bytes_out": sum(c.bytes_out for c in self.clients.values()),
                "bytes_in": sum(c.bytes_in for c in self.clients.values()),
                "tokens": self.tokens_streamed}
