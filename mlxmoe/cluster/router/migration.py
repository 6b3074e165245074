"""Soft and hard migration (modes soft/hard): re-score a session's
transcript, and once a challenger group has won `checks` consecutive checks
by `margin`, make it the group computing the session's experts: soft (the
node keeps trunk and KV and calls that group's node per MoE layer) or hard
(the KV moves: export -> import -> re-pin -> close the old copy).

Functions of (turn context, chat): the fleet, the modes' settings, scoring
and the counters (context.py), never the Router."""

from __future__ import annotations

import asyncio
import logging
import time

from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.router.chats import Chat
from mlxmoe.cluster.router.context import TurnContext
from mlxmoe.cluster.router.fleet import Fleet
from mlxmoe.cluster.router.ranking import GONE
from mlxmoe.errors import RpcError

log = logging.getLogger("mlxmoe.router")


def challenge(s: Chat, scores: dict[int, float], ranked: list[int], margin: float) -> tuple[int, float]:
    """Update the session's streak from fresh scores: (best group, its lead over the current one)."""
    current = s.group if s.expert_group is None else s.expert_group
    best = ranked[0]
    lead = scores[best] - scores.get(current, 0.0)
    if best != current and lead >= margin:
        s.streak = (best, s.streak[1] + 1 if s.streak[0] == best else 1)
    else:
        s.streak = (None, 0)
    return best, lead


async def recheck(cx: TurnContext, s: Chat, tokens: list[int], at: str) -> bool:
    """Re-score, and migrate if due. True if the chat moved."""
    target = await decide(cx, s, tokens, at)
    return target is not None and await migrate(cx, s, target, at)


async def decide(cx: TurnContext, s: Chat, tokens: list[int], at: str) -> int | None:
    """Re-score S(g) on the transcript's last `window` tokens; the group to
    migrate to once a challenger has won `checks` checks in a row, else None."""
    try:
        sc, ms = await cx.score(tokens[-cx.mob.window:] if cx.mob.window else tokens)
    except Exception as e:  # scoring must never cost the turn
        log.warning("session %s: re-scoring failed: %s", s.id, e)
        return None
    scores = dict(sc.scores)
    current = s.group if s.expert_group is None else s.expert_group
    s.scores, s.ranked, s.margin = scores, list(sc.ranked), float(sc.margin)
    best, lead = challenge(s, scores, list(sc.ranked), cx.mob.margin)
    s.last_check = {"at": at, "tokens": len(tokens), "current": current, "best": best,
                    "lead": round(lead, 4), "streak": s.streak[1], "ms": round(ms, 1)}
    if s.streak[1] < cx.mob.checks:
        return None
    s.streak = (None, 0)
    return best


async def migrate(cx: TurnContext, s: Chat, target: int, at: str = "manual") -> bool:
    """Make `target` the group that computes the session's experts: hard
    (move the KV) when the mode and size allow, else soft. True if done."""
    rec = {"at": at, "turn": s.turns, "from": s.group if s.expert_group is None else s.expert_group,
           "to": target, "node_from": s.peer, "time": time.time()}
    t0 = time.perf_counter()
    ok = False
    if s.mode == "hard" and target != s.group:
        if len(s.context) <= cx.mob.hard_max_tokens:
            ok = await hard(cx, s, target, rec)
        else:
            rec["note"] = f"{len(s.context)} tokens > hard_max_tokens {cx.mob.hard_max_tokens}: soft instead"
    if not ok:
        if "error" in rec:
            rec["hard_error"] = rec.pop("error")
        ok = soft(cx.fleet, s, target, rec)
    rec.update(ok=ok, ms=round((time.perf_counter() - t0) * 1e3, 1), node_to=s.peer)
    s.migrations.append(rec)
    if ok:
        cx.count("migrations")
        log.info("session %s: %s migration to group %d (%s)", s.id, rec["kind"], target, at)
    return ok


def soft(fleet: Fleet, s: Chat, target: int, rec: dict) -> bool:
    rec["kind"] = "soft"
    if target == s.group:
        s.expert_group = None  # back home: local again
        return True
    p = fleet.peer(s.peer)
    if target not in {int(g) for g in fleet.group_urls(skip=p)}:
        rec["error"] = f"no live node serves group {target}"
        return False
    s.expert_group = target
    return True


async def hard(cx: TurnContext, s: Chat, target: int, rec: dict) -> bool:
    """export (old node) -> import (new node) -> re-pin -> close the old
    copy. Nothing is lost on failure: the session stays pinned where it
    was, or, if the old node is gone, is rebuilt on the new one from the
    transcript the next turn carries."""
    rec["kind"] = "hard"
    fleet = cx.fleet
    src = fleet.peer(s.peer)
    dests = fleet.destinations(target, skip=s.peer)
    if src is None or not dests:
        rec["error"] = f"no live node serves group {target}" if not dests else "session not placed yet"
        return False
    dst, t = dests[0], cx.mob.migrate_timeout
    try:
        state = await export_session(fleet.client(src), s.id, t)
    except RpcError as e:
        if e.code not in GONE:
            rec["error"] = f"export from {src.name} failed: {e.message}"
            return False
        fleet.peers.mark_down(src, e.message)
        state = None  # the old node is gone: rebuild from the transcript on the new one
        rec["rebuilt"] = True
    if state is not None:
        try:
            await fleet.client(dst).call("import_session", {"state": state}, timeout=t)
        except RpcError as e:
            rec["error"] = f"import into {dst.name} failed: {e.message}"
            fleet.failed(dst, e)
            fleet.close_later(s.id, dst.name)  # a half-imported copy, if any
            return False
        rec["state_tokens"] = len(state.get("tokens") or [])
    old = s.peer
    s.peer, s.group, s.expert_group = dst.name, target, None
    dst.active_sessions += 1
    if state is not None:
        fleet.close_later(s.id, old)
    return True


async def export_session(c: NodeClient, sid: str, timeout: float) -> dict:
    """export_session, waiting while the node still finishes a cancelled
    stream (it refuses with session_busy until cache and tokens agree)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await c.call("export_session", {"session": sid}, timeout=timeout)
        except RpcError as e:
            if e.code != "session_busy" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def peer_failed(fleet: Fleet, s: Chat, e: RpcError) -> None:
    """The pinned node's remote-expert peer failed: find out which nodes
    are gone, and decode locally rather than through that peer again."""
    try:
        await asyncio.wait_for(fleet.probe_all(), 3.0)
    except asyncio.TimeoutError:
        pass
    if s.expert_group is not None:
        s.migrations.append({"at": "peer failed", "turn": s.turns, "kind": "fallback", "from": s.expert_group,
                             "to": s.group, "ok": True, "error": e.message, "time": time.time()})
        s.expert_group = None
