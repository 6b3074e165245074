"""The Router: peers (mDNS and static, probed every `probe_interval`), the
session index, and the turns it opens; placement decisions come from
placement.py, migration from migration.py, race from race.py."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import zlib
from array import array
from typing import Any

import aiohttp

from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.discovery import NOT_PROBED, WAITING, Browser, Peer, PeerTable
from mlxmoe.cluster.mobility import Mobility
from mlxmoe.cluster.router import meter, migration, placement
from mlxmoe.cluster.router.sessions import Session, SessionIndex, session_ref
from mlxmoe.cluster.router.turn import Rejected, Turn
from mlxmoe.cluster.worker import EngineWorker
from mlxmoe.errors import ContextOverflow, RpcError
from mlxmoe.modes import MIGRATING, PER_LAYER

log = logging.getLogger("mlxmoe.router")


def new_session_id() -> str:
    """192 random bits: a session id cannot be guessed (SECURITY.md)."""
    return "s-" + secrets.token_urlsafe(24)
SCORE_WINDOW = 4096  # tokens the front end scores at most (the end of the prompt: nearest to what comes next)
API_SESSION_TTL = 120.0  # idle seconds kept for a chat the client gave no session id (one-shot API requests)
ACTIVE_S = 60.0  # a session used this recently counts as active on the status page, else as kept
COUNTERS = ("requests", "failovers", "rejected", "migrations", "races")


class Router:
    def __init__(self, frontend: Any, key: bytes, *, frontend_factory: Any = None,
                 static_peers: list[str] = (), mdns: bool = True,
                 interface: str | None = None, probe_interval: float = 2.0, token_timeout: float = 60.0,
                 first_token_timeout: float = 300.0, tie_margin: float | None = None, session_ttl: float = 1800.0,
                 max_failovers: int = 3, mobility: Mobility | dict | None = None, tls: Any = None,
                 api_keys: list[str] = (), vocab_size: int | None = None, context_limit: int | None = None,
                 score_window: int = SCORE_WINDOW, api_session_ttl: float = API_SESSION_TTL):
        # frontend_factory() runs on the frontend's thread (MLX streams are per thread)
        self.frontend, self.key, self.frontend_factory = frontend, key, frontend_factory
        self.model, self.manifest_hash, self.n_groups = "", "", 0
        self.peers = PeerTable(self.manifest_hash, self.n_groups, self.model, tls=tls is not None)
        if frontend is not None:
            self._bind(frontend)
        for url in static_peers:
            self.peers.add_static(url)
        self.mdns, self.interface = mdns, interface
        self.probe_interval, self.token_timeout = probe_interval, token_timeout
        self.first_token_timeout = first_token_timeout
        self.session_ttl, self.max_failovers = session_ttl, max_failovers
        self.api_session_ttl = min(api_session_ttl, session_ttl)
        self.mob = mobility if isinstance(mobility, Mobility) else Mobility.from_dict(mobility or {})
        self.tie_margin = self.mob.tie_margin if tie_margin is None else tie_margin
        self.tls = tls  # a cluster.tls.Identity: dial nodes with mutual TLS only (docs/SECURITY.md)
        self.sessions = SessionIndex()
        self.api_keys = [k for k in api_keys if k]  # empty: no API key (serve allows that on loopback only)
        self.vocab_override, self.context_override = vocab_size, context_limit
        self.score_window = score_window
        self.node_context: dict[str, int] = {}  # node name -> the context_limit its info reports
        self.last_placement: dict | None = None
        self.counters = dict.fromkeys(COUNTERS, 0)  # read-only outside: count() bumps them
        self.tokens_streamed = 0
        self.started = time.time()
        self.worker = EngineWorker("mlxmoe-frontend")
        self.http: aiohttp.ClientSession | None = None
        self.clients: dict[str, NodeClient] = {}
        self.browser: Browser | None = None
        self.busy_until: dict[str, float] = {}  # node name -> until when it said "full" (429/503)
        self.streaming_at: dict[str, float] = {}  # node name -> when one of our streams last got a frame
        self._tasks: set[asyncio.Task] = set()
        self._probe_task: asyncio.Task | None = None
        self._key_warned: set[str] = set()  # peer URLs already logged as refusing our key

    def _bind(self, frontend: Any) -> None:
        self.frontend = frontend
        man = frontend.manifest
        self.model, self.manifest_hash, self.n_groups = man.model_id, man.hash, man.n_groups
        self.peers.manifest_hash, self.peers.n_groups, self.peers.model = man.hash, man.n_groups, man.model_id

    @property
    def held_experts(self) -> dict[int, int]:
        """Experts each group's node holds over all MoE layers (a layout's nodes differ), from the manifest."""
        m = self.frontend.manifest if self.frontend is not None else None
        if not hasattr(m, "eligible"):
            return {}
        if getattr(self, "_held", None) is None:
            self._held = {g: sum(len(m.eligible(g, l)) for l in m.moe_layers) for g in range(m.n_groups)}
        return self._held

    @property
    def sampling_defaults(self) -> dict:
        """What a request that leaves a sampling field out gets (the node resolves the same)."""
        return self.frontend.sampling_defaults if self.frontend is not None else {}

    async def add_peer(self, url: str) -> None:
        """A node this router is told of (a Mac that joined), beside what Bonjour finds."""
        await self.probe(self.peers.add_static(url))

    async def adopt(self, frontend_factory) -> None:
        """Serve a new manifest of the same model (a Mac joined: `mlxmoe up`): its front end (built
        on the worker thread), then every peer probed again under the new hash."""
        self.frontend_factory = frontend_factory
        self._bind(await self.worker.call(frontend_factory))
        self._held = None
        for c in self.clients.values():
            c.mh = self.manifest_hash  # every call names the manifest it expects
        await self.probe_all()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            if self.frontend is None:
                self._bind(await self.worker.call(self.frontend_factory))
            from mlxmoe.cluster.tls import client_context
            ssl = client_context(self.tls) if self.tls is not None else True
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ssl))
            if self.mdns:
                self.browser = Browser(self._on_mdns, self.interface)
                await self.browser.start()
            await self.probe_all()
        except BaseException:  # a half-started router: no unclosed session, no thread left running
            await self.stop()
            raise
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
        await asyncio.to_thread(self.worker.join, 10)  # MLX aborts the process if its thread outlives it

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
            c = self.clients[p.url] = _CountingClient(self.http, p.url, self.key, self.manifest_hash, p.name)
        c.name, c.peer, c.streaming_at = p.name, p, self.streaming_at
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
        timeout = max(2.0, self.probe_interval * 2)
        try:
            info = await self.client(p).call("info", {"held": self.held_on(p)}, timeout=timeout)
        except RpcError as e:
            self._log_key_refusal(p, e)
            if e.code == "manifest_mismatch":
                self.peers._set(p, "ignored", e.message)
            elif not placement.down_after_failed_probe(e.code, self.streaming_at.get(p.name), time.time(), timeout,
                                                       p.inflight):
                log.info("peer %s: info probe failed (%s) but it is streaming to us: busy, not down", p.name, e.message)
            elif p.state == "up" or (p.state == "down" and p.reason in (NOT_PROBED, WAITING)):
                self.peers.mark_down(p, f"info probe failed: {e.message}")  # keep an earlier, better reason
            return
        if isinstance(info.get("unavailable"), str):  # up and answering, but its engine cannot generate
            self.peers.mark_down(p, f"its engine cannot generate: {info['unavailable'][:300]}")
            return
        self.peers.from_info(p, info)
        p.streams, p.queued = _count(info.get("streams")), _count(info.get("queued"))
        if p.state == "up" and placement.stalled(info.get("stalled_s"), self.first_token_timeout):
            self.peers.mark_down(p, f"its engine has made no progress for {info['stalled_s']:.0f}s")
        if isinstance(info.get("context_limit"), int) and not isinstance(info["context_limit"], bool):
            self.node_context[p.name] = info["context_limit"]
        self._harvest(p, info)

    async def first_token_late(self, p: Peer) -> bool:
        """`p` sent no first token within first_token_timeout. If its health
        still answers and its engine is not stalled, it is busy (queued work
        ahead of ours), not down: True, and it goes last for a while. Else it is
        marked down: False."""
        await self.probe(p)
        if p.state == "up" and time.time() - p.last_seen < 5:
            self.mark_busy(p, None)
            return True
        if p.state == "up":
            self.peers.mark_down(p, f"no first token within {self.first_token_timeout:.0f}s")
        return False

    def held_on(self, p: Peer) -> list[str]:
        """The sessions this router pins to `p`: each probe tells the node, which
        closes our other idle sessions there (after a router restart: all of
        them; node_server.close_unheld, docs/SECURITY.md)."""
        return [s.id for s in self.sessions if s.peer == p.name]

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
                if p.name == s.peer:
                    s.meter, s.meter_seen = meter.harvest(s.meter, s.meter_seen, st)

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
    def candidates(self, s: Session, exclude: set[str] = frozenset(), params: dict | None = None) -> list[Peer]:
        """Live peers for this session, best first (placement.rank_candidates);
        a deterministic request's (`params`: temperature 0 or a seed) by group id among tied groups."""
        return placement.rank_candidates(self.peers.live(), s.scores, s.ranked, self.tie_margin, self.busy_until,
                                         time.time(), pinned=s.peer, exclude=exclude,
                                         deterministic=placement.deterministic(params or {}, self.sampling_defaults),
                                         tie_key=s.tie_key, prefer=s.prefer, held=self.held_experts)

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
            peers = placement.remote_peers(self.group_urls(skip=p), p.groups)  # a lost node's replica, if any
            s.without = placement.missing_groups(self.n_groups, p.groups, peers)
            return {**params, "routing": s.mode, "peers": peers}
        eg = s.expert_group
        if eg is not None and eg not in p.groups:
            url = self.group_urls(skip=p).get(str(eg))
            if url is not None:
                return {**params, "routing": "group", "expert_group": eg, "peers": {str(eg): url}}
            log.warning("session %s: no live node serves expert group %s; decoding locally", s.id, eg)
        return params

    # ---------------------------------------------------------------- limits
    def _config(self) -> dict:
        model = getattr(self.frontend.manifest, "model", None) if self.frontend is not None else None
        cfg = model.get("config") if isinstance(model, dict) else None
        return cfg if isinstance(cfg, dict) else {}

    @property
    def vocab_size(self) -> int | None:
        """Token ids must be below this (the bundle's config), None if unknown."""
        v = self.vocab_override or self._config().get("vocab_size")
        return int(v) if v else None

    @property
    def context_limit(self) -> int | None:
        """The smallest context known: the bundle's max_position_embeddings and
        what each live node reports; a prompt must be shorter than it."""
        known = [self.context_override, self._config().get("max_position_embeddings")]
        live = {p.name for p in self.peers.live()}
        known += [c for n, c in self.node_context.items() if n in live]
        known = [int(c) for c in known if c]
        return min(known) if known else None

    def model_names(self) -> tuple[str, ...]:
        """Names a request may give as `model`: the manifest's model id, and its last path part."""
        return tuple(dict.fromkeys([self.model, self.model.rsplit("/", 1)[-1]]))

    # ---------------------------------------------------------------- sessions
    async def score(self, tokens: list[int]) -> tuple[Any, float]:
        """S(g) of `tokens` on the trunk front end: (PlacementScores, ms).
        Only the last `score_window` tokens: the front end's memory grows with
        the square of the length, and must stay bounded (SECURITY.md)."""
        tokens = tokens[-self.score_window:]
        t0 = time.perf_counter()
        sc = await self.worker.call(self.frontend.score, tokens)
        return sc, getattr(sc, "elapsed_ms", 0.0) or (time.perf_counter() - t0) * 1000

    async def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """template_kwargs: the chat template's extra arguments (`tools=`: api/tools.py render)."""
        return await self.worker.call(lambda: self.frontend.encode_chat(messages, **template_kwargs))

    async def encode(self, text: str) -> list[int]:
        return await self.worker.call(self.frontend.encode, text)

    def prompt_problem(self, tokens: list[int]) -> str | None:
        """Why `tokens` must not reach the front end (None: fine). The API
        refuses such prompts first (openai.check_tokens); this is the last guard."""
        vocab, ctx = self.vocab_size, self.context_limit
        if not tokens:
            return "the prompt has no tokens"
        if vocab is not None and any(not 0 <= t < vocab for t in tokens):
            return f"token ids outside the vocabulary (0..{vocab - 1})"
        if ctx is not None and len(tokens) >= ctx:
            return f"{len(tokens)} tokens do not fit the context limit of {ctx} tokens"
        return None

    async def session_for(self, tokens: list[int], hint: str | None = None,
                          messages: list[dict] | None = None, mode: str | None = None, owner: str = "",
                          prefer: str | None = None) -> Session:
        """The existing session of `owner` this request continues, or a new one
        placed now. `mode` (None: the session's own, or the router's default
        for a new one). A session id of another owner is unknown (SessionIndex.find)."""
        s = self.sessions.find(hint, messages, owner)
        if s is not None:
            if hint is not None:
                s.ttl = None  # continued by its id: the client keeps it, not a one-shot request
            if mode is not None and mode != s.mode:
                s.set_mode(mode)
            s.prefer = prefer or s.prefer
            return s
        problem = self.prompt_problem(tokens)
        if problem is not None:  # never score what no node can run (SECURITY.md: validate before any work)
            raise ContextOverflow(f"prompt: {problem}")
        sc, ms = await self.score(tokens)
        s = Session(id=new_session_id(), scores=dict(sc.scores), ranked=list(sc.ranked),
                    margin=float(sc.margin), tie_key=zlib.crc32(array("i", tokens).tobytes()), ephemeral=hint is None and messages is None,
                    mode=mode or self.mob.mode, owner=owner, prefer=prefer or "quality",
                    ttl=self.api_session_ttl if hint is None else None)
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
            if s.turns > 0:
                await self.meter_turn(s, prompt)
            if s.turns > 0 and s.mode in MIGRATING:
                await migration.recheck(self, s, prompt, "turn")
            if s.mode == "race" and s.turns == 0 and s.peer is None:
                await turn.race()
            if not turn.done:
                await turn.connect(first=True)
        except BaseException as e:
            s.streaming = False  # no turn streams after all
            s.lock.release()
            if isinstance(e, (Rejected, RpcError)) and not s.placed:
                self.forget(s)
            raise
        return turn

    async def meter_turn(self, s: Session, prompt: list[int]) -> None:
        """At a turn boundary, act on a quality meter that stayed low (router/meter.py)."""
        pinned = self.peers.peers.get(s.peer) if s.peer else None
        act = meter.action(s.meter, self.mob.meter_threshold, self.mob.meter_checks, s.mode, s.meter_replaced,
                           bool(self.group_urls(skip=pinned)))
        if act == "stay":
            return
        low = s.meter[-self.mob.meter_checks:]
        s.meter, s.meter_seen = [], 0  # fresh evidence after a change (a moved chat's node counts anew)
        if act == "split":
            s.mode = "split"
            s.migrations.append({"at": "meter", "turn": s.turns, "to": "split", "meter": low, "time": time.time()})
            log.info("session %s: quality meter %s below %s: split routing", s.id, low, self.mob.meter_threshold)
            return
        s.meter_replaced = True
        try:
            sc, _ = await self.score(prompt[-self.mob.window:] if self.mob.window else prompt)
        except Exception as e:  # scoring must never cost the turn
            log.warning("session %s: re-scoring for the quality meter failed: %s", s.id, e)
            return
        current = s.group if s.expert_group is None else s.expert_group
        if sc.best != current:
            log.info("session %s: quality meter %s below %s: re-placed on group %s", s.id, low,
                     self.mob.meter_threshold, sc.best)
            await migration.migrate(self, s, int(sc.best), "meter")

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
    def status(self, owner: str | None = "") -> dict:
        """The router's state; session ids only for the sessions of `owner`
        (an API key's hash, "" without keys; None: nobody's), the others by
        their short hash (sessions.session_ref)."""
        def show(sid: str) -> str:
            s = self.sessions.get(sid)
            return sid if owner is not None and s is not None and s.owner == owner else session_ref(sid)
        lp = self.last_placement
        now = time.time()
        shown = [{**s.status(now, ACTIVE_S), "id": show(s.id)} for s in session_order(self.sessions)
                 if not s.ephemeral or s.streaming]  # a one-shot completion shows while it streams
        return {"model": self.model, "manifest_hash": self.manifest_hash, "uptime_s": time.time() - self.started,
                "peers": [self._peer_status(d) for d in self.peers.status()],
                "sessions": shown,
                "last_placement": lp and self._placed(lp, show), "counters": dict(self.counters),
                "mobility": self.mob.to_dict(), "traffic": self.traffic()}

    def _placed(self, lp: dict, show) -> dict:
        """The latest placement with where its session runs now (the best-scored group may have had no
        free node, or lost a race or a failover since)."""
        s = self.sessions.get(lp["session"])
        return {**lp, "session": show(lp["session"]), "node": s.peer if s else None, "group": s.group if s else None}

    def _peer_status(self, d: dict) -> dict:
        """A peer's status with its load: the node's streams and queue as of
        its last info, the streams this router has open on it, and the queue
        depth placement ranks by (placement.load)."""
        q = expected_quality(getattr(self.frontend, "manifest", None), d.get("groups"))
        d = {**d, "expected_quality": q} if q else d
        p = self.peers.peers.get(d["name"]) or self.peer(d["name"])
        if p is None:
            return d
        return {**d, "streams": p.streams, "queued": p.queued, "inflight": p.inflight,
                "queue_depth": max(p.inflight, p.streams + p.queued)}

    def traffic(self) -> dict:
        return {"bytes_out": sum(c.bytes_out for c in self.clients.values()),
                "bytes_in": sum(c.bytes_in for c in self.clients.values()),
                "tokens": self.tokens_streamed}


def session_order(sessions) -> list[Session]:
    """Generating first (in-flight chats above the fold), then oldest first."""
    return sorted(sessions, key=lambda s: (not s.streaming, s.created))


def expected_quality(manifest, groups) -> dict | None:
    """A peer's expected quality, pinned, from a layout bundle's calibration (each node's measured
    quality on held-out passages, `calibration.layout.nodes[g].held_out`): {"ppl_ratio": mean,
    "worst_ppl_ratio": worst domain, "agreement": mean}; over several groups, the worst of them.
    None when the manifest has no such measurement for every one of `groups`."""
    cal = getattr(manifest, "calibration", None)
    nodes = ((cal.get("layout") or {}).get("nodes") if isinstance(cal, dict) else None) or []
    held = [nodes[g].get("held_out") if isinstance(g, int) and 0 <= g < len(nodes) and isinstance(nodes[g], dict)
            else None for g in groups or []]
    if not held or not all(isinstance(h, dict) and "mean" in h and "worst" in h for h in held):
        return None
    try:
        return {"ppl_ratio": round(max(float(h["mean"]["ppl_ratio"]) for h in held), 4),
                "worst_ppl_ratio": round(max(float(h["worst"]["ppl_ratio"]) for h in held), 4),
                "agreement": round(min(float(h["mean"]["agreement"]) for h in held), 4)}
    except (KeyError, TypeError, ValueError):
        return None


def _count(v: Any) -> int:
    """A non-negative count from a node's info (0 if absent or malformed)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class _CountingClient(NodeClient):
    """NodeClient whose generate streams count in their peer's `inflight`
    from the moment they are opened (not at their first token: concurrent
    placements must see each other to spread, placement.load) until they end,
    and stamp `streaming_at` on every frame (a busy node is not a down one)."""

    peer: Peer
    streaming_at: dict[str, float]

    def generate(self, session: str, prompt: list[int], params: dict, token_timeout: float = 60.0):
        return _Counted(self, super().generate(session, prompt, params, token_timeout))


class _Counted:
    def __init__(self, c: _CountingClient, frames):
        self.c, self.p, self.frames, self.open = c, c.peer, frames, True
        self.p.inflight += 1

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        try:
            f = await self.frames.__anext__()
        except BaseException:
            self._release()
            raise
        self.c.streaming_at[self.p.name] = time.time()
        return f

    async def aclose(self) -> None:
        self._release()
        await self.frames.aclose()

    def _release(self) -> None:
        if self.open:
            self.open = False
            self.p.inflight -= 1
