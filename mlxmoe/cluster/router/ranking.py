"""Ranking nodes, as pure functions: which nodes, in which order, serve a
chat, given the groups' scores S(g) (model/placement.py), the nodes' groups,
load and health (busy_until: node name -> time until which it said "full"),
and the time. No I/O here: the fleet (fleet.py) passes in its live peers and its clock.

A peer is anything with .name, .url, .groups and the load fields below
(discovery.Peer).

Load (docs/ARCHITECTURE.md, The router): the streams a node is running or
queueing: this router's own open streams (`inflight`, counted the moment a
stream is opened, so concurrent placements see each other) or what the node
last reported (`streams` + `queued`), whichever is more; then sessions held,
then free memory. Load orders nodes only among equals: the pinned node, then
nodes that did not just say "full", then groups within the tie margin of the
best; a group that leads by more than the margin wins whatever its load. A
deterministic request (temperature 0 or a seed: `deterministic`) never
spreads across groups: tied groups go by group id, and load orders only the
replicas of one group, so the same request lands on the same group (and
gives the same text) every time."""

from __future__ import annotations

import hashlib

from typing import Iterable, Protocol, Sequence

from mlxmoe.params import GenParams

GONE = ("unreachable", "disconnected", "timeout")  # RPC error codes that mean the node itself is gone


class PeerLike(Protocol):
    name: str
    url: str
    groups: list[int]
    inflight: int
    streams: int
    queued: int
    active_sessions: int
    free_memory: int


def load(p: PeerLike) -> tuple:
    """Sort key, least loaded first: streams running or waiting, sessions held, more free memory, name."""
    return max(p.inflight, p.streams + p.queued), p.active_sessions, -p.free_memory, p.name


def stalled(stalled_s, limit: float) -> bool:
    """A node that answers health but whose engine has been stuck in one job
    or token round for longer than `limit` (the first-token timeout) is down."""
    return isinstance(stalled_s, (int, float)) and not isinstance(stalled_s, bool) and stalled_s > limit


def down_after_failed_probe(code: str, streaming_at: float | None, now: float, grace: float,
                            inflight: int = 0) -> bool:
    """Does a failed health probe mean the node is down? Not when it only
    timed out while one of our streams from it delivered a token within
    `grace` seconds, or while it prefills a stream of ours (`inflight`, no
    token yet): it is busy, and a stream that stalls fails over by itself
    (token_timeout, first_token_timeout)."""
    if code == "timeout" and inflight > 0:
        return False
    if code in ("timeout", "unreachable") and streaming_at is not None:
        return now - streaming_at > grace
    return True


def group_for(ranked: Sequence[int], groups: Iterable[int]) -> int:
    """The group a node serves for a session: its best-ranked one (a group
    the session never scored ranks last)."""
    return min(groups, key=lambda g: ranked.index(g) if g in ranked else len(ranked))


def busy(name: str, busy_until: dict[str, float], now: float) -> bool:
    return busy_until.get(name, 0) > now


def node_rank(p: PeerLike, busy_until: dict[str, float], now: float) -> tuple:
    """Sort key of a node for new work: not busy (429/503 lately) first, then least loaded."""
    return busy(p.name, busy_until, now), load(p)


def deterministic(params: GenParams, defaults: dict | None = None) -> bool:
    """Does this request get reproducible text (temperature 0, or a seed)? An
    unset temperature is the model's default (`defaults`): greedy unless its
    generation_config samples."""
    t = params.temperature
    return params.seed is not None or (t if t is not None else (defaults or {}).get("temperature")) == 0


def rank_candidates(peers: Iterable[PeerLike], scores: dict[int, float], ranked: Sequence[int],
                    tie_margin: float, busy_until: dict[str, float], now: float,
                    pinned: str | None = None, exclude: Iterable[str] = (), deterministic: bool = False,
                    tie_key: int = 0, prefer: str = "quality", held: dict[int, int] | None = None,
                    shared: dict[str, int] | None = None) -> list:
    """Peers for a session, best first: the pinned node, then nodes that did
    not just say "full", then by the rank of the peer's best group (groups
    within `tie_margin` of the best tie, and replicas of one group tie; for a
    `deterministic` request tied groups go by score, an exact tie in an order
    fixed by `tie_key`, the prompt's: the same prompt always lands on the same
    group; only replicas tie), then least loaded (load()). Among tied groups a
    larger set (`held`: experts a group holds over all layers, a layout's unequal
    nodes) goes first: the placement layer cannot see what it holds after it.
    prefer="speed": load before rank (a chat may go to a node with a smaller set:
    it serves it sooner). Next to load: the node that holds more of the prompt's
    prefix (`shared`: node name -> tokens, prefix_index.py) skips that much
    prefill; with prefer="quality" it goes before load."""
    best = scores[ranked[0]]
    exclude = set(exclude)

    def bucket(p: PeerLike) -> tuple:
        g = group_for(ranked, p.groups)
        if g not in scores:
            return len(ranked), 0, 0.0, b""
        if best - scores[g] <= tie_margin:
            bigger = -(held or {}).get(g, 0)
            if not deterministic:
                return 0, bigger, 0.0, b""
            return 0, bigger, -scores[g], hashlib.blake2b(f"{tie_key}:{g}".encode(), digest_size=8).digest()
        return ranked.index(g), 0, 0.0, b""

    out = [p for p in peers if p.name not in exclude]
    shared = shared or {}
    if prefer == "speed":
        out.sort(key=lambda p: (p.name != pinned, busy(p.name, busy_until, now), load(p)[:-1],
                                -shared.get(p.name, 0), bucket(p), p.name))  # (load's last: the name)
    else:
        out.sort(key=lambda p: (p.name != pinned, busy(p.name, busy_until, now), bucket(p), -shared.get(p.name, 0),
                                load(p)))
    return out


def race_candidates(candidates: Iterable[PeerLike], ranked: Sequence[int], n: int) -> list:
    """The first (best) candidate of each distinct group, at most `n`."""
    out, seen = [], set()
    for p in candidates:
        g = group_for(ranked, p.groups)
        if g not in seen and len(out) < n:
            seen.add(g)
            out.append(p)
    return out


def group_urls(peers: Iterable[PeerLike], busy_until: dict[str, float], now: float,
               skip: str | None = None) -> dict[str, str]:
    """str(group) -> URL of the best node (node_rank) serving it, not `skip` (a name)."""
    out: dict[str, tuple] = {}
    for p in peers:
        if skip is not None and p.name == skip:
            continue
        rank = node_rank(p, busy_until, now)
        for g in p.groups:
            if str(g) not in out or rank < out[str(g)][0]:
                out[str(g)] = (rank, p.url)
    return {g: v[1] for g, v in sorted(out.items())}


def destinations(peers: Iterable[PeerLike], group: int, busy_until: dict[str, float], now: float,
                 skip: str | None = None) -> list:
    """Nodes serving `group` (hard migration targets), best first, not `skip`."""
    return sorted((p for p in peers if group in p.groups and p.name != skip),
                  key=lambda p: node_rank(p, busy_until, now))


def missing_groups(n_groups: int, own_groups: Iterable[int], peers: dict[str, str]) -> list[int]:
    """The groups a per-layer routing (onehop/split) has no node for: their experts are not used."""
    return sorted(set(range(n_groups)) - set(own_groups) - {int(g) for g in peers})


def remote_peers(urls: dict[str, str], own_groups: Iterable[int]) -> dict[str, str]:
    """The group URLs a node may call per layer (onehop/split): the groups it lacks."""
    own = set(own_groups)
    return {g: u for g, u in urls.items() if int(g) not in own}
