"""The fleet: the nodes a router knows and how it reaches them. Peers (static
and Bonjour, PeerTable), one NodeClient per peer (counting its open streams
and bytes), probing every peer's info each `probe_interval`, busy marks,
closing sessions on nodes, and the choice among live nodes (ranking.py's pure
functions over the live peers, the busy marks and the clock).

The fleet knows no chats but as ranking reads them (scores, pinned node, mode);
the router hooks in what a probe needs of its chats: the sessions it pins to a
node (`held`, told on every probe), each probe's info (`on_info`: per-session
stats) and the end of each probe round (`on_round`: idle chats expire)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import aiohttp

from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.discovery import NOT_PROBED, WAITING, Browser, Peer, PeerTable
from mlxmoe.cluster.router import ranking
from mlxmoe.cluster.router.chats import Chat
from mlxmoe.errors import RpcError
from mlxmoe.modes import PER_LAYER
from mlxmoe.params import GenParams

log = logging.getLogger("mlxmoe.router")
MDNS_FORGET_S = 600.0  # a Bonjour peer gone this long is forgotten


class Fleet:
    def __init__(self, key: bytes, *, static_peers: list[str] = (), mdns: bool = True, interface: str | None = None,
                 probe_interval: float = 2.0, token_timeout: float = 60.0, first_token_timeout: float = 300.0,
                 tie_margin: float = 0.02, tls: Any = None,
                 held: Callable[[Peer], list[str]] = lambda p: [],
                 on_info: Callable[[Peer, dict], None] = lambda p, info: None,
                 on_round: Callable[[], None] = lambda: None):
        self.key, self.tls = key, tls  # tls: a cluster.tls.Identity: dial nodes with mutual TLS only (SECURITY.md)
        self.manifest: Any = None
        self.model, self.manifest_hash, self.n_groups = "", "", 0
        self.peers = PeerTable(self.manifest_hash, self.n_groups, self.model, tls=tls is not None)
        for url in static_peers:
            self.peers.add_static(url)
        self.mdns, self.interface = mdns, interface
        self.probe_interval, self.token_timeout = probe_interval, token_timeout
        self.first_token_timeout, self.tie_margin = first_token_timeout, tie_margin
        self.held, self.on_info, self.on_round = held, on_info, on_round
        self.node_context: dict[str, int] = {}  # node name -> the context_limit its info reports
        self.http: aiohttp.ClientSession | None = None
        self.clients: dict[str, NodeClient] = {}
        self.browser: Browser | None = None
        self.busy_until: dict[str, float] = {}  # node name -> until when it said "full" (429/503)
        self.streaming_at: dict[str, float] = {}  # node name -> when one of our streams last got a frame
        self._tasks: set[asyncio.Task] = set()
        self._probe_task: asyncio.Task | None = None
        self._key_warned: set[str] = set()  # peer URLs already logged as refusing our key
        self._held_experts: dict[int, int] | None = None

    def bind(self, manifest: Any) -> None:
        """Serve `manifest`: peers of another hash are ignored, every call names it."""
        self.manifest, self._held_experts = manifest, None
        self.model, self.manifest_hash, self.n_groups = manifest.model_id, manifest.hash, manifest.n_groups
        self.peers.manifest_hash, self.peers.n_groups, self.peers.model = manifest.hash, manifest.n_groups, manifest.model_id
        for c in self.clients.values():
            c.mh = self.manifest_hash

    @property
    def held_experts(self) -> dict[int, int]:
        """Experts each group's node holds over all MoE layers (a layout's nodes differ), from the manifest."""
        m = self.manifest
        if not hasattr(m, "eligible"):
            return {}
        if self._held_experts is None:
            self._held_experts = {g: sum(len(m.eligible(g, l)) for l in m.moe_layers) for g in range(m.n_groups)}
        return self._held_experts

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Connect, browse and probe every peer once; then probe in the background."""
        from mlxmoe.cluster.tls import client_context
        ssl = client_context(self.tls) if self.tls is not None else True
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ssl))
        if self.mdns:
            self.browser = Browser(self._on_mdns, self.interface)
            await self.browser.start()
        await self.probe_all()
        self.spawn(self._warn_if_alone())
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

    def spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- peers and clients
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

    async def add(self, url: str) -> None:
        """A node this router is told of (a Mac that joined), beside what Bonjour finds."""
        await self.probe(self.peers.add_static(url))

    def mark_busy(self, p: Peer, retry_after: float | None) -> None:
        """`p` said "full": it goes last among candidates for Retry-After seconds (2 if none)."""
        self.busy_until[p.name] = time.time() + (retry_after or 2)

    def failed(self, p: Peer | None, e: RpcError) -> None:
        """A call to `p` failed: a node that is gone (ranking.GONE) is down until a probe says better."""
        if p is not None and e.code in ranking.GONE:
            self.peers.mark_down(p, e.message)

    def close_later(self, sid: str, peer_name: str | None) -> None:
        """Close the session's copy on that node, in the background (best effort)."""
        self.spawn(self._close_on_node(sid, peer_name))

    async def _close_on_node(self, sid: str, peer_name: str | None) -> None:
        p = self.peer(peer_name)
        if p is not None and p.state == "up":
            try:
                await self.client(p).call("close", {"session": sid}, timeout=10)
            except RpcError:
                pass

    def context_limits(self) -> list[int]:
        """The context limits the live nodes report."""
        live = {p.name for p in self.peers.live()}
        return [c for n, c in self.node_context.items() if n in live]

    def traffic(self) -> dict:
        return {"bytes_out": sum(c.bytes_out for c in self.clients.values()),
                "bytes_in": sum(c.bytes_in for c in self.clients.values())}

    # ---------------------------------------------------------------- probing
    def _on_mdns(self, name: str, rec: dict | None) -> None:
        self.peers.from_mdns(name, rec)
        p = self.peers.peers.get(name)
        if rec is not None and p is not None and p.state != "ignored":
            self.spawn(self.probe(p))  # verify it holds the key before using it

    async def probe(self, p: Peer) -> None:
        timeout = max(2.0, self.probe_interval * 2)
        try:
            info = await self.client(p).call("info", {"held": self.held(p)}, timeout=timeout)
        except RpcError as e:
            self._log_key_refusal(p, e)
            if e.code == "manifest_mismatch":
                self.peers._set(p, "ignored", e.message)
            elif not ranking.down_after_failed_probe(e.code, self.streaming_at.get(p.name), time.time(), timeout,
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
        if p.state == "up" and ranking.stalled(info.get("stalled_s"), self.first_token_timeout):
            self.peers.mark_down(p, f"its engine has made no progress for {info['stalled_s']:.0f}s")
        if isinstance(info.get("context_limit"), int) and not isinstance(info["context_limit"], bool):
            self.node_context[p.name] = info["context_limit"]
        self.on_info(p, info)

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
        log.warning("no node is up: %s. Chats fail until one is (a node of this manifest: `mlxmoe node BUNDLE "
                    "--group N`, or `mlxmoe up` on a member)", where)

    async def probe_named(self, names: set[str], timeout: float) -> None:
        """Probe the live nodes of `names` now, for at most `timeout` seconds."""
        peers = [p for p in self.peers.live() if p.name in names]
        if peers:
            try:
                await asyncio.wait_for(asyncio.gather(*(self.probe(p) for p in peers)), timeout)
            except asyncio.TimeoutError:
                pass

    async def probe_all(self) -> None:
        now = time.time()
        for name, p in list(self.peers.peers.items()):  # forget Bonjour peers gone for 10 minutes
            if p.source == "mdns" and p.state != "up" and now - p.last_seen > MDNS_FORGET_S:
                del self.peers.peers[name]
        peers = [p for p in self.peers.peers.values()]
        if peers:
            await asyncio.gather(*(self.probe(p) for p in peers))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe_all()
                self.on_round()
            except Exception:  # never let the loop die
                log.exception("probe loop")

    # ---------------------------------------------------------------- choice
    def candidates(self, s: Chat, exclude: set[str] = frozenset(), deterministic: bool = False) -> list[Peer]:
        """Live peers for this chat, best first (ranking.rank_candidates); a
        deterministic request's (temperature 0 or a seed) by group id among tied groups."""
        return ranking.rank_candidates(self.peers.live(), s.scores, s.ranked, self.tie_margin, self.busy_until,
                                       time.time(), pinned=s.peer, exclude=exclude, deterministic=deterministic,
                                       tie_key=s.tie_key, prefer=s.prefer, held=self.held_experts, shared=s.shared)

    def group_for(self, s: Chat, p: Peer) -> int:
        """The group `p` serves for chat `s`: its best-ranked one."""
        return ranking.group_for(s.ranked, p.groups)

    def race_candidates(self, s: Chat, n: int) -> list[Peer]:
        """The best live node of each of the `n` best-scoring groups (distinct groups)."""
        return ranking.race_candidates(self.candidates(s), s.ranked, n)

    def group_urls(self, skip: Peer | None = None) -> dict[str, str]:
        """str(group) -> URL of the least loaded live node serving it (not `skip`)."""
        return ranking.group_urls(self.peers.live(), self.busy_until, time.time(),
                                  skip=None if skip is None else skip.name)

    def destinations(self, group: int, skip: str | None = None) -> list[Peer]:
        """Live nodes serving `group`, best first (not the one named `skip`)."""
        return ranking.destinations(self.peers.live(), group, self.busy_until, time.time(), skip=skip)

    def node_params(self, s: Chat, p: Peer, params: GenParams) -> GenParams:
        """Generate params for `s` on `p`: the mode's routing fields (none for
        strictly local decode, so nodes without remote calls still serve pin)."""
        if s.mode in PER_LAYER:
            peers = ranking.remote_peers(self.group_urls(skip=p), p.groups)  # a lost node's replica, if any
            s.without = ranking.missing_groups(self.n_groups, p.groups, peers)
            return params.edit(routing=s.mode, peers=peers)
        eg = s.expert_group
        if eg is not None and eg not in p.groups:
            url = self.group_urls(skip=p).get(str(eg))
            if url is not None:
                return params.edit(routing="group", expert_group=eg, peers={str(eg): url})
            log.warning("session %s: no live node serves expert group %s; decoding locally", s.id, eg)
        return params


def _count(v: Any) -> int:
    """A non-negative count from a node's info (0 if absent or malformed)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class _CountingClient(NodeClient):
    """NodeClient whose generate streams count in their peer's `inflight`
    from the moment they are opened (not at their first token: concurrent
    placements must see each other to spread, ranking.load) until they end,
    and stamp `streaming_at` on every frame (a busy node is not a down one)."""

    peer: Peer
    streaming_at: dict[str, float]

    def generate(self, session: str, prompt: list[int], params: GenParams, token_timeout: float = 60.0):
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
