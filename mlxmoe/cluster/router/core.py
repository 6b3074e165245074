"""The Router: its chats, the turns it opens on them, and what the HTTP API
asks of it (tokens, placement of a new chat, headers, status). The nodes are
its fleet (fleet.py: peers, clients, probing, candidates); ranking.py ranks
them, turn.py runs a turn across failovers, race.py and migration.py the
modes that move a chat. Those three get a TurnContext (context.py), never the
Router."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import zlib
from array import array
from typing import Any

from mlxmoe.cluster.discovery import Peer, PeerTable
from mlxmoe.cluster.mobility import Mobility
from mlxmoe.cluster.router import migration, quality_watch, ranking
from mlxmoe.cluster.router.chats import Chat, ChatIndex
from mlxmoe.cluster.router.context import TurnContext
from mlxmoe.cluster.router.fleet import Fleet
from mlxmoe.cluster.router.prefix_index import PrefixIndex
from mlxmoe.cluster.router.turn import Rejected, Turn
from mlxmoe.cluster.sessionview import session_ref
from mlxmoe.cluster.worker import EngineWorker
from mlxmoe.errors import ContextOverflow, RpcError
from mlxmoe.modes import MIGRATING, PER_LAYER
from mlxmoe.params import GenParams

log = logging.getLogger("mlxmoe.router")


def new_session_id() -> str:
    """192 random bits: a session id cannot be guessed (SECURITY.md)."""
    return "s-" + secrets.token_urlsafe(24)
SCORE_WINDOW = 4096  # tokens the front end scores at most (the end of the prompt: nearest to what comes next)
API_SESSION_TTL = 120.0  # idle seconds kept for a chat the client gave no session id (one-shot API requests)
ACTIVE_S = 60.0  # a session used this recently counts as active on the status page, else as kept


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
        self.session_ttl = session_ttl
        self.api_session_ttl = min(api_session_ttl, session_ttl)
        self.mob = mobility if isinstance(mobility, Mobility) else Mobility.from_dict(mobility or {})
        self.tls = tls  # a cluster.tls.Identity: dial nodes with mutual TLS only (docs/SECURITY.md)
        self.fleet = Fleet(key, static_peers=static_peers, mdns=mdns, interface=interface,
                           probe_interval=probe_interval, token_timeout=token_timeout,
                           first_token_timeout=first_token_timeout,
                           tie_margin=self.mob.tie_margin if tie_margin is None else tie_margin, tls=tls,
                           held=self.held_on, on_info=self._harvest, on_round=self._expire_sessions)
        if frontend is not None:
            self._bind(frontend)
        self.cx = TurnContext(self.fleet, self.mob, self.score, max_failovers)
        self.sessions = ChatIndex()
        self.prefixes = PrefixIndex()  # which node holds which prompt prefixes (router/prefix_index.py)
        self.api_keys = [k for k in api_keys if k]  # empty: no API key (serve allows that on loopback only)
        self.vocab_override, self.context_override = vocab_size, context_limit
        self.score_window = score_window
        self.last_placement: dict | None = None
        self.started = time.time()
        self.worker = EngineWorker("mlxmoe-frontend")

    def _bind(self, frontend: Any) -> None:
        self.frontend = frontend
        self.fleet.bind(frontend.manifest)

    # what the API and the status page read of the fleet and the counters
    @property
    def peers(self) -> PeerTable:
        return self.fleet.peers

    @property
    def model(self) -> str:
        return self.fleet.model

    @property
    def manifest_hash(self) -> str:
        return self.fleet.manifest_hash

    @property
    def n_groups(self) -> int:
        return self.fleet.n_groups

    @property
    def counters(self) -> dict[str, int]:
        """Read-only outside: count() bumps them."""
        return self.cx.counters

    @property
    def sampling_defaults(self) -> dict:
        """What a request that leaves a sampling field out gets (the node resolves the same)."""
        return self.frontend.sampling_defaults if self.frontend is not None else {}

    async def add_peer(self, url: str) -> None:
        """A node this router is told of (a Mac that joined), beside what Bonjour finds."""
        await self.fleet.add(url)

    async def adopt(self, frontend_factory) -> None:
        """Serve a new manifest of the same model (a Mac joined: `mlxmoe up`): its front end (built
        on the worker thread), then every peer probed again under the new hash."""
        self.frontend_factory = frontend_factory
        self._bind(await self.worker.call(frontend_factory))
        await self.fleet.probe_all()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            if self.frontend is None:
                self._bind(await self.worker.call(self.frontend_factory))
            await self.fleet.start()
        except BaseException:  # a half-started router: no unclosed session, no thread left running
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.fleet.stop()
        self.worker.stop()
        await asyncio.to_thread(self.worker.join, 10)  # MLX aborts the process if its thread outlives it

    def count(self, name: str) -> None:
        self.cx.count(name)

    # ---------------------------------------------------------------- what probes carry
    def held_on(self, p: Peer) -> list[str]:
        """The sessions this router pins to `p`: each probe tells the node, which
        closes our other idle sessions there (after a router restart: all of
        them; node_server.close_unheld, docs/SECURITY.md)."""
        return [s.id for s in self.sessions if s.peer == p.name]

    def _harvest(self, p: Peer, info: dict) -> None:
        """Per-session remote-call counters and quality meter from a node's info (mode != pin)."""
        stats = info.get("session_stats")
        if not isinstance(stats, dict):
            return
        for sid, st in stats.items():
            s = self.sessions.get(sid)
            if s is not None and isinstance(st, dict):
                s.remote[p.name] = {k: st.get(k) for k in ("routing", "remote_calls", "remote_bytes", "remote_s")}
                if p.name == s.peer:
                    s.meter, s.meter_seen = quality_watch.harvest(s.meter, s.meter_seen, st)

    async def refresh_remote(self, timeout: float = 2.0) -> None:
        """Fresh remote-call counts for the status page: probe the nodes that
        hold sessions routed beyond themselves."""
        await self.fleet.probe_named({s.peer for s in self.sessions if s.routing != "local" or s.remote}, timeout)

    def _expire_sessions(self) -> None:
        for s in self.sessions.expired(time.time(), self.session_ttl):
            self.forget(s)
            self.fleet.close_later(s.id, s.peer)

    def forget(self, s: Chat) -> None:
        self.sessions.forget(s)

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
        known = [self.context_override, self._config().get("max_position_embeddings")] + self.fleet.context_limits()
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
                          prefer: str | None = None) -> Chat:
        """The existing chat of `owner` this request continues, or a new one
        placed now. `mode` (None: the chat's own, or the router's default
        for a new one). A session id of another owner is unknown (ChatIndex.find)."""
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
        s = Chat(id=new_session_id(), scores=dict(sc.scores), ranked=list(sc.ranked),
                 margin=float(sc.margin), tie_key=zlib.crc32(array("i", tokens).tobytes()), ephemeral=hint is None and messages is None,
                 mode=mode or self.mob.mode, owner=owner, prefer=prefer or "quality",
                 ttl=self.api_session_ttl if hint is None else None, shared=self.prefixes.shared(tokens))
        self.sessions.add(s, hint)
        self.last_placement = {"session": s.id, "scores": {str(g): v for g, v in sc.scores.items()},
                               "margin": float(sc.margin), "best": int(sc.best), "layers": list(sc.layers),
                               "elapsed_ms": ms}
        return s

    def remember_turn(self, s: Chat, messages: list[dict], reply: str) -> None:
        """After a completed chat turn: the next turn's prefix leads here."""
        self.sessions.remember_turn(s, messages, reply)

    # ---------------------------------------------------------------- turns
    async def open_turn(self, s: Chat, prompt: list[int], params: GenParams) -> Turn:
        """Count the request and connect its turn to a node (pinned one first).
        Raises Rejected when no node can take it, RpcError for a request the
        node refuses (4xx); a chat that never ran a turn is then forgotten."""
        self.count("requests")
        await s.lock.acquire()
        turn = Turn(self.cx, s, prompt, params, on_end=self.end_turn,
                    deterministic=ranking.deterministic(params, self.sampling_defaults))
        try:
            if s.turns > 0:
                await self.meter_turn(s, prompt)
            if s.turns > 0 and s.mode in MIGRATING:
                await migration.recheck(self.cx, s, prompt, "turn")
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

    async def meter_turn(self, s: Chat, prompt: list[int]) -> None:
        """At a turn boundary, act on a quality meter that stayed low (router/quality_watch.py)."""
        pinned = self.peers.peers.get(s.peer) if s.peer else None
        act = quality_watch.action(s.meter, self.mob.meter_threshold, self.mob.meter_checks, s.mode,
                                   s.meter_replaced, bool(self.fleet.group_urls(skip=pinned)))
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
            await migration.migrate(self.cx, s, int(sc.best), "meter")

    def end_turn(self, s: Chat, context: list[int]) -> None:
        """A turn is over (Turn.close): update the chat; an ephemeral one
        (no hint, no messages: /v1/completions) is forgotten and closed."""
        s.end_turn(context)
        if s.peer is not None and s.mode not in PER_LAYER and s.expert_group is None:  # KV of its own experts
            self.prefixes.record(s.peer, context)
        if s.ephemeral:
            self.forget(s)
            self.fleet.close_later(s.id, s.peer)

    def headers(self, s: Chat) -> dict:
        return {"X-MLXMoE-Session": s.id, "X-MLXMoE-Node": s.peer or "", "X-MLXMoE-Group": str(s.group),
                "X-MLXMoE-Mode": s.mode,
                "X-MLXMoE-Margin": f"{s.margin:.4f}",
                "X-MLXMoE-Scores": json.dumps({str(g): round(v, 4) for g, v in s.scores.items()})}

    # ---------------------------------------------------------------- status
    def status(self, owner: str | None = "") -> dict:
        """The router's state; session ids only for the chats of `owner`
        (an API key's hash, "" without keys; None: nobody's), the others by
        their short hash (sessionview.session_ref)."""
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
        """The latest placement with where its chat runs now (the best-scored group may have had no
        free node, or lost a race or a failover since)."""
        s = self.sessions.get(lp["session"])
        return {**lp, "session": show(lp["session"]), "node": s.peer if s else None, "group": s.group if s else None}

    def _peer_status(self, d: dict) -> dict:
        """A peer's status with its load: the node's streams and queue as of
        its last info, the streams this router has open on it, and the queue
        depth placement ranks by (ranking.load)."""
        q = expected_quality(getattr(self.frontend, "manifest", None), d.get("groups"))
        d = {**d, "expected_quality": q} if q else d
        p = self.peers.peers.get(d["name"]) or self.fleet.peer(d["name"])
        if p is None:
            return d
        return {**d, "streams": p.streams, "queued": p.queued, "inflight": p.inflight,
                "queue_depth": max(p.inflight, p.streams + p.queued)}

    def traffic(self) -> dict:
        return {**self.fleet.traffic(), "tokens": self.cx.tokens}


def session_order(sessions) -> list[Chat]:
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
