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

Modes (per session, chosen per request or by the router's default):
  pin     decode on the placed node, strictly local (the default)
  soft    pin; at turn boundaries (and every `check_every` tokens) S(g) is
          re-scored on the transcript's last `window` tokens (the newest
          topic, not the whole history's mean); a group that beats the current one by
          `margin` for `checks` consecutive checks becomes the session's
          expert group: the node keeps trunk and KV and calls that group's
          node for every MoE layer (routing="group")
  hard    the same rule, but the session's KV moves to a node of the winning
          group (export -> import -> re-pin -> close the old copy) while the
          session is young (<= `hard_max_tokens`); otherwise as soft. A move
          that fails midway leaves the session where it was (or, if the old
          node died, rebuilds it from the transcript on the new one)
  onehop  pin; the node picks, per MoE layer and token, the group with the
          most top-k mass (routing="onehop", peers = one live node per group)
  split   as onehop, but top-k over the node's own experts united with the
          picked group's; only the chosen experts it lacks run remotely
          (routing="split")
  race    2-3 nodes of the best-scoring groups each generate `race_tokens`
          tokens of the first answer; the best mean log-prob is pinned, its
          tokens streamed, the others' sessions closed
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

from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.discovery import Browser, Peer, PeerTable
from mlxmoe.errors import RpcError
from mlxmoe.cluster.mobility import MODES, Mobility
from mlxmoe.cluster.worker import EngineWorker

log = logging.getLogger("mlxmoe.router")
GONE = ("unreachable", "disconnected", "timeout")  # RPC error codes that mean the node itself is gone


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
    mode: str = "pin"
    expert_group: int | None = None  # soft migration: the group computing every MoE layer's experts
    context: list[int] = field(default_factory=list)  # last turn's prompt + reply
    streak: tuple = (None, 0)  # (challenger group, consecutive checks it won)
    last_check: dict | None = None
    migrations: list[dict] = field(default_factory=list)
    race: dict | None = None
    remote: dict = field(default_factory=dict)  # node name -> {"routing", "remote_calls", "remote_bytes", "remote_s"}

    @property
    def routing(self) -> str:
        if self.mode in ("onehop", "split"):
            return self.mode
        return "group" if self.expert_group is not None and self.expert_group != self.group else "local"

    def status(self) -> dict:
        return {"id": self.id, "node": self.peer, "group": self.group,
                "scores": {str(g): s for g, s in self.scores.items()}, "margin": self.margin,
                "mode": self.mode, "routing": self.routing,
                "expert_group": self.group if self.expert_group is None else self.expert_group,
                "migrations": list(self.migrations), "last_check": self.last_check, "race": self.race,
                "remote_calls": sum(int(v.get("remote_calls") or 0) for v in self.remote.values()),
                "remote_bytes": sum(int(v.get("remote_bytes") or 0) for v in self.remote.values()),
                "remote_s": round(sum(float(v.get("remote_s") or 0) for v in self.remote.values()), 4),
                "turns": self.turns, "tokens": self.tokens,
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
        self.sessions: dict[str, Session] = {}
        self.index: dict[str, str] = {}  # hint / prefix hash -> session id
        self.last_placement: dict | None = None
        self.counters = {"requests": 0, "failovers": 0, "rejected": 0, "migrations": 0, "races": 0}
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
            if e.code == "manifest_mismatch":
                self.peers._set(p, "ignored", e.message)
            elif p.state == "up" or (p.state == "down" and p.reason == "not probed yet"):
                self.peers.mark_down(p, f"info probe failed: {e.message}")  # keep an earlier, better reason
            return
        self.peers.from_info(p, info)
        self._harvest(p, info)

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
        names = {s.peer for s in self.sessions.values() if s.routing != "local" or s.remote}
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
                await self._expire_sessions()
            except Exception:  # never let the loop die
                log.exception("probe loop")

    async def _expire_sessions(self) -> None:
        now = time.time()
        for s in [s for s in self.sessions.values() if now - s.last_used > self.session_ttl and not s.lock.locked()]:
            self.forget(s)
            self._spawn(self._close_on_node(s.id, s.peer))

    async def _close_on_node(self, sid: str, peer_name: str | None) -> None:
        p = self.peer(peer_name)
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
                          messages: list[dict] | None = None, mode: str | None = None) -> Session:
        """The existing session this request continues, or a new one placed now.
        `mode` (None: the session's own, or the router's default for a new one)."""
        sid = None
        if hint:
            sid = hint if hint in self.sessions else self.index.get("h:" + hint)
        elif messages is not None:
            head = before_last_user(messages)
            if head is not None:
                sid = self.index.get(prefix_key(head))
        if sid is not None and sid in self.sessions:
            s = self.sessions[sid]
            if mode is not None and mode != s.mode:
                s.mode = mode
                if mode not in ("soft", "hard"):
                    s.expert_group, s.streak = None, (None, 0)  # decode local again
            return s
        sc, ms = await self._score(tokens)
        s = Session(id="s-" + os.urandom(8).hex(), scores=dict(sc.scores), ranked=list(sc.ranked),
                    margin=float(sc.margin), ephemeral=hint is None and messages is None,
                    mode=mode or self.mob.mode)
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
            if s.turns > 0 and s.mode in ("soft", "hard"):
                await self.recheck(s, prompt, "turn")
            if s.mode == "race" and s.turns == 0 and s.peer is None:
                await turn.race()
            if not turn.done:
                await turn.connect(first=True)
        except BaseException:
            s.lock.release()
            raise
        return turn

    # ---------------------------------------------------------------- mobility
    def group_urls(self, skip: Peer | None = None) -> dict[str, str]:
        """str(group) -> URL of the least loaded live node serving it (not `skip`)."""
        out: dict[str, tuple] = {}
        now = time.time()
        for p in self.peers.live():
            if skip is not None and p.name == skip.name:
                continue
            rank = self._rank(p, now)
            for g in p.groups:
                if str(g) not in out or rank < out[str(g)][0]:
                    out[str(g)] = (rank, p.url)
        return {g: v[1] for g, v in sorted(out.items())}

    def _rank(self, p: Peer, now: float) -> tuple:
        """Sort key of a node for new work: not busy (429/503 lately) first, then least loaded."""
        return self._busy_until.get(p.name, 0) > now, p.load

    def node_params(self, s: Session, p: Peer, params: dict) -> dict:
        """Generate params for `s` on `p`: the mode's routing fields (none for
        strictly local decode, so nodes without remote calls still serve pin)."""
        if s.mode in ("onehop", "split"):
            peers = {g: u for g, u in self.group_urls(skip=p).items() if int(g) not in p.groups}
            return {**params, "routing": s.mode, "peers": peers}
        eg = s.expert_group
        if eg is not None and eg not in p.groups:
            url = self.group_urls(skip=p).get(str(eg))
            if url is not None:
                return {**params, "routing": "group", "expert_group": eg, "peers": {str(eg): url}}
            log.warning("session %s: no live node serves expert group %s; decoding locally", s.id, eg)
        return params

    async def recheck(self, s: Session, tokens: list[int], at: str) -> bool:
        """Re-score, and migrate if due. True if the session moved."""
        target = await self.decide(s, tokens, at)
        return target is not None and await self.migrate(s, target, at)

    async def decide(self, s: Session, tokens: list[int], at: str) -> int | None:
        """Re-score S(g) on the transcript; the group to migrate to once a
        challenger has won `checks` consecutive checks by `margin`, else None."""
        try:
            sc, ms = await self._score(tokens[-self.mob.window:] if self.mob.window else tokens)
        except Exception as e:  # scoring must never cost the turn
            log.warning("session %s: re-scoring failed: %s", s.id, e)
            return None
        scores = dict(sc.scores)
        s.scores, s.ranked, s.margin = scores, list(sc.ranked), float(sc.margin)
        current = s.group if s.expert_group is None else s.expert_group
        best = sc.ranked[0]
        lead = scores[best] - scores.get(current, 0.0)
        if best != current and lead >= self.mob.margin:
            s.streak = (best, s.streak[1] + 1 if s.streak[0] == best else 1)
        else:
            s.streak = (None, 0)
        s.last_check = {"at": at, "tokens": len(tokens), "current": current, "best": best,
                        "lead": round(lead, 4), "streak": s.streak[1], "ms": round(ms, 1)}
        if s.streak[1] < self.mob.checks:
            return None
        s.streak = (None, 0)
        return best

    async def migrate(self, s: Session, target: int, at: str = "manual") -> bool:
        """Make `target` the group that computes the session's experts: hard
        (move the KV) when the mode and size allow, else soft. True if done."""
        rec = {"at": at, "turn": s.turns, "from": s.group if s.expert_group is None else s.expert_group,
               "to": target, "node_from": s.peer, "time": time.time()}
        t0 = time.perf_counter()
        if s.mode == "hard" and len(s.context) <= self.mob.hard_max_tokens and target != s.group:
            ok = await self._hard(s, target, rec)
        elif s.mode == "hard" and target != s.group:
            rec["note"] = f"{len(s.context)} tokens > hard_max_tokens {self.mob.hard_max_tokens}: soft instead"
            ok = False
        else:
            ok = False
        if not ok:
            if "error" in rec:
                rec["hard_error"] = rec.pop("error")
            ok = self._soft(s, target, rec)
        rec.update(ok=ok, ms=round((time.perf_counter() - t0) * 1e3, 1), node_to=s.peer)
        s.migrations.append(rec)
        if ok:
            self.counters["migrations"] += 1
            log.info("session %s: %s migration to group %d (%s)", s.id, rec["kind"], target, at)
        return ok

    def _soft(self, s: Session, target: int, rec: dict) -> bool:
        rec["kind"] = "soft"
        if target == s.group:
            s.expert_group = None  # back home: local again
            return True
        p = self.peer(s.peer)
        if target not in {int(g) for g in self.group_urls(skip=p)}:
            rec["error"] = f"no live node serves group {target}"
            return False
        s.expert_group = target
        return True

    async def _hard(self, s: Session, target: int, rec: dict) -> bool:
        """export (old node) -> import (new node) -> re-pin -> close the old
        copy. Nothing is lost on failure: the session stays pinned where it
        was, or, if the old node is gone, is rebuilt on the new one from the
        transcript the next turn carries."""
        rec["kind"] = "hard"
        now = time.time()
        src = self.peer(s.peer)
        dests = sorted((p for p in self.peers.live() if target in p.groups and p.name != s.peer),
                       key=lambda p: self._rank(p, now))
        if src is None or not dests:
            rec["error"] = f"no live node serves group {target}" if not dests else "session not placed yet"
            return False
        dst, t = dests[0], self.mob.migrate_timeout
        try:
            state = await self._export(src, s.id, t)
        except RpcError as e:
            if e.code not in GONE:
                rec["error"] = f"export from {src.name} failed: {e.message}"
                return False
            self.peers.mark_down(src, e.message)
            state = None  # the old node is gone: rebuild from the transcript on the new one
            rec["rebuilt"] = True
        if state is not None:
            try:
                await self.client(dst).call("import_session", {"state": state}, timeout=t)
            except RpcError as e:
                rec["error"] = f"import into {dst.name} failed: {e.message}"
                if e.code in GONE:
                    self.peers.mark_down(dst, e.message)
                self._spawn(self._close_on_node(s.id, dst.name))  # a half-imported copy, if any
                return False
            rec["state_tokens"] = len(state.get("tokens") or [])
        old = s.peer
        s.peer, s.group, s.expert_group = dst.name, target, None
        dst.active_sessions += 1
        if state is not None:
            self._spawn(self._close_on_node(s.id, old))
        return True

    async def _export(self, src: Peer, sid: str, timeout: float) -> dict:
        """export_session, waiting while the node still finishes a cancelled
        stream (it refuses with session_busy until cache and tokens agree)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.client(src).call("export_session", {"session": sid}, timeout=timeout)
            except RpcError as e:
                if e.code != "session_busy" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def peer_failed(self, s: Session, e: RpcError) -> None:
        """The pinned node's remote-expert peer failed: find out which nodes
        are gone, and decode locally rather than through that peer again."""
        try:
            await asyncio.wait_for(self.probe_all(), 3.0)
        except asyncio.TimeoutError:
            pass
        if s.expert_group is not None:
            s.migrations.append({"at": "peer failed", "turn": s.turns, "kind": "fallback", "from": s.expert_group,
                                 "to": s.group, "ok": True, "error": e.message, "time": time.time()})
            s.expert_group = None

    def race_candidates(self, s: Session) -> list[Peer]:
        """The best live node of each of the best-scoring groups (distinct groups)."""
        out, seen = [], set()
        for p in self.candidates(s):
            g = self.group_for(s, p)
            if g not in seen and len(out) < self.mob.race_candidates:
                seen.add(g)
                out.append(p)
        return out

    def headers(self, s: Session) -> dict:
        return {"X-MLXMoE-Session": s.id, "X-MLXMoE-Node": s.peer or "", "X-MLXMoE-Group": str(s.group),
                "X-MLXMoE-Mode": s.mode,
                "X-MLXMoE-Margin": f"{s.margin:.4f}",
                "X-MLXMoE-Scores": json.dumps({str(g): round(v, 4) for g, v in s.scores.items()})}

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        return {"model": self.model, "manifest_hash": self.manifest_hash, "uptime_s": time.time() - self.started,
                "peers": self.peers.status(),
                "sessions": [s.status() for s in sorted(self.sessions.values(), key=lambda s: s.created)
                             if not s.ephemeral],
                "last_placement": self.last_placement, "counters": dict(self.counters),
                "mobility": self.mob.to_dict(), "traffic": self.traffic()}

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
        self.peer_retries = 0
        self._frames: AsyncIterator[dict] | None = None
        self._first: dict | None = None
        self._queued: list[dict] = []  # race winner's frames, already in `generated`
        self._closed = False

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.params["max_tokens"] or self.finish_reason == "stop"

    async def connect(self, first: bool = False, migrated: bool = False) -> None:
        r, s = self.r, self.s
        remaining = self.params["max_tokens"] - len(self.generated)
        params = {**self.params, "max_tokens": remaining}
        prompt = self.prompt + self.generated
        retry_after, last_err = None, None
        for p in r.candidates(s, self.tried):
            self.tried.add(p.name)
            try:
                frames, first_frame = await self._start(p, prompt, params)
            except asyncio.TimeoutError:
                r.peers.mark_down(p, f"no first token within {r.first_token_timeout:.0f}s")
                continue
            except RpcError as e:
                last_err = e
                if e.status in (429, 503):
                    r._busy_until[p.name] = time.time() + (e.retry_after or 2)
                    retry_after = min(retry_after or 1e9, e.retry_after or 2)
                    continue
                if e.retryable:
                    if e.code in GONE:
                        r.peers.mark_down(p, e.message)
                    continue
                raise  # the request itself is bad (e.g. context overflow): same on every node
            moved = s.peer is not None and s.peer != p.name
            if (moved or not first) and not (migrated and not moved):
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

    async def _start(self, p: Peer, prompt: list[int], params: dict) -> tuple[AsyncIterator[dict], dict | None]:
        """Start generating on `p`: (frames, first frame or None). A failed
        remote-expert peer gets one retry on the same node, routed without it."""
        r, s = self.r, self.s
        for attempt in range(2):
            frames = r.client(p).generate(s.id, prompt, r.node_params(s, p, params), token_timeout=r.token_timeout)
            try:
                return frames, await asyncio.wait_for(frames.__anext__(), r.first_token_timeout)
            except StopAsyncIteration:
                return frames, None
            except RpcError as e:
                await frames.aclose()
                if e.code != "peer_failed" or attempt:
                    raise
                await r.peer_failed(s, e)
            except asyncio.TimeoutError:
                await frames.aclose()
                raise

    async def race(self) -> None:
        """Race placement: the best node of each of the top groups generates
        K tokens; the best mean log-prob is pinned, the others closed."""
        r, s = self.r, self.s
        cands = r.race_candidates(s)
        if len(cands) < 2:
            return  # nothing to race: plain placement
        k = min(r.mob.race_tokens, self.params["max_tokens"])
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(self._race_one(p, {**self.params, "max_tokens": k}) for p in cands))
        means = [sum(f["logprob"] for f in toks) / len(toks) if toks else None for toks, _ in runs]
        ok = [i for i, m in enumerate(means) if m is not None]
        w = max(ok, key=lambda j: means[j]) if ok else None  # first (best-scored) wins a tie
        for i, p in enumerate(cands):
            if i != w:
                r._spawn(r._close_on_node(s.id, p.name))  # losers (and failed runs) drop their caches
        if w is None:
            return  # every run failed: plain placement tries the next nodes
        win, (toks, end) = cands[w], runs[w]
        s.peer, s.group = win.name, r.group_for(s, win)
        win.active_sessions += 1
        s.race = {"winner": s.group, "node": win.name, "tokens": k, "ms": round((time.perf_counter() - t0) * 1e3, 1),
                  "mean_logprob": {str(r.group_for(s, p)): None if m is None else round(m, 4)
                                   for p, m in zip(cands, means)}}
        r.counters["races"] += 1
        self._queued = toks
        self.generated = [int(f["token"]) for f in toks]
        self.finish_reason = end or toks[-1].get("finish_reason")
        if self.finish_reason == "length" and len(self.generated) < self.params["max_tokens"]:
            self.finish_reason = None  # only the race's K tokens ran out: the answer goes on

    async def _race_one(self, p: Peer, params: dict) -> tuple[list[dict], str | None]:
        """(token frames, finish reason) of K tokens from `p`; ([], None) if it failed."""
        r, toks = self.r, []
        frames = r.client(p).generate(self.s.id, self.prompt, r.node_params(self.s, p, params),
                                      token_timeout=r.token_timeout)
        try:
            async with asyncio.timeout(r.first_token_timeout):
                async for f in frames:
                    if f["t"] == "end":
                        return toks, f.get("finish_reason")
                    toks.append(f)
        except (RpcError, TimeoutError) as e:
            log.warning("race: node %s failed: %s", p.name, e)
            if isinstance(e, RpcError) and e.status in (429, 503):
                r._busy_until[p.name] = time.time() + (e.retry_after or 2)
            elif not isinstance(e, RpcError) or e.code in GONE:
                r.peers.mark_down(p, str(e) or "race timed out")
        finally:
            await frames.aclose()
        return [], None

    async def events(self) -> AsyncIterator[dict]:
        """Token frames {"token","text","logprob","finish_reason"} across failovers."""
        try:
            for f in self._queued:  # race winner: already counted in `generated`
                self.r.tokens_streamed += 1
                yield f
            self._queued = []
            while True:
                if self._frames is None and self._first is None:
                    if self.done:
                        self.finish_reason = self.finish_reason or "length"
                        return
                    await self.connect()
                try:
                    async for f in self._iter():
                        if f["t"] == "end":
                            self.finish_reason = f.get("finish_reason") or self.finish_reason or "length"
                            return
                        self.generated.append(int(f["token"]))
                        self.r.tokens_streamed += 1
                        self.finish_reason = f.get("finish_reason")
                        yield f
                        if await self._maybe_recheck():
                            break  # reconnect with the new routing (the cache prefix is reused)
                    else:
                        return
                except RpcError as e:
                    if e.code == "peer_failed" and self.peer_retries < 2:
                        self.peer_retries += 1  # the node is fine, a peer it called is not: same node, new routing
                        await self.r.peer_failed(self.s, e)
                        self.tried.discard(self.s.peer)
                    elif not e.retryable or self.failovers >= self.r.max_failovers:
                        raise
                    if e.code in GONE:
                        p = self.r.peer(self.s.peer)
                        if p is not None:
                            self.r.peers.mark_down(p, e.message)
                    migrated = e.code == "peer_failed"
                    if len(self.generated) >= self.params["max_tokens"] or self.finish_reason:
                        self.finish_reason = self.finish_reason or "length"
                        return  # the node died after its last token: nothing left to do
                    await self._close_frames()
                    try:
                        await self.connect(migrated=migrated)
                    except Rejected as rej:
                        raise RpcError(503, "failover_failed", f"node failed mid-stream ({e.message}) and no "
                                       f"other node could continue: {rej.message}") from None
        finally:
            await self.close()

    async def _maybe_recheck(self) -> bool:
        """Every `check_every` tokens (soft/hard): re-score; if the session
        migrated, close this stream so the caller reconnects."""
        r, s, n = self.r, self.s, len(self.generated)
        if not r.mob.check_every or s.mode not in ("soft", "hard") or n % r.mob.check_every or self.finish_reason:
            return False
        s.context = self.prompt + self.generated
        target = await r.decide(s, s.context, f"token {n}")
        if target is None:
            return False
        await self._close_frames()  # the node stops this stream before its session is exported
        await r.migrate(s, target, f"token {n}")  # if it fails, the session goes on as it was
        self.tried.clear()
        try:
            await self.connect(migrated=True)
        except Rejected as rej:
            raise RpcError(503, "migration_failed", f"session moved to group {s.group} but no node could "
                           f"continue it: {rej.message}") from None
        return True

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
        s.context = self.prompt + self.generated
        s.last_used = time.time()
        if s.lock.locked():
            s.lock.release()
        if s.ephemeral:
            self.r.forget(s)
            self.r._spawn(self.r._close_on_node(s.id, s.peer))
