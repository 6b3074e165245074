"""Race placement (mode race): the best node of each of the top groups
generates `race_tokens` tokens of the first answer; the best mean log-prob
is pinned and its tokens kept, the others' sessions closed."""

from __future__ import annotations

import asyncio
import logging
import time

from mlxmoe.cluster.discovery import Peer
from mlxmoe.cluster.router.chats import Chat
from mlxmoe.cluster.router.context import TurnContext
from mlxmoe.cluster.router.fleet import Fleet
from mlxmoe.cluster.router.ranking import GONE
from mlxmoe.errors import RpcError
from mlxmoe.params import GenParams

log = logging.getLogger("mlxmoe.router")


async def race(cx: TurnContext, s: Chat, prompt: list[int], params: GenParams) -> tuple[list[dict], str | None] | None:
    """Run the race and pin the winner: (its token frames, finish reason),
    or None when there was nothing to race or every run failed (then plain
    placement goes on)."""
    fleet = cx.fleet
    cands = fleet.race_candidates(s, cx.mob.race_candidates)
    if len(cands) < 2:
        return None
    k = min(cx.mob.race_tokens, params.max_tokens)
    t0 = time.perf_counter()
    capped = params.edit(max_tokens=k, open_end=k < params.max_tokens)  # exact splice
    runs = await asyncio.gather(*(run_one(fleet, s, p, prompt, capped) for p in cands))
    means = [sum(f["logprob"] for f in toks) / len(toks) if toks else None for toks, _ in runs]
    ok = [i for i, m in enumerate(means) if m is not None]
    w = max(ok, key=lambda j: means[j]) if ok else None  # first (best-scored) wins a tie
    for i, p in enumerate(cands):
        if i != w:
            fleet.close_later(s.id, p.name)  # losers (and failed runs) drop their caches
    if w is None:
        return None
    win = cands[w]
    s.peer, s.group = win.name, fleet.group_for(s, win)
    win.active_sessions += 1
    s.race = {"winner": s.group, "node": win.name, "tokens": k, "ms": round((time.perf_counter() - t0) * 1e3, 1),
              "mean_logprob": {str(fleet.group_for(s, p)): None if m is None else round(m, 4)
                               for p, m in zip(cands, means)}}
    cx.count("races")
    return runs[w]


async def run_one(fleet: Fleet, s: Chat, p: Peer, prompt: list[int], params: GenParams) -> tuple[list[dict], str | None]:
    """(token frames, finish reason) of K tokens from `p`; ([], None) if it failed."""
    toks = []
    frames = fleet.client(p).generate(s.id, prompt, fleet.node_params(s, p, params), token_timeout=fleet.token_timeout)
    try:
        async with asyncio.timeout(fleet.first_token_timeout):
            async for f in frames:
                if f["t"] == "end":
                    return toks, f.get("finish_reason")
                toks.append(f)
    except (RpcError, TimeoutError) as e:
        log.warning("race: node %s failed: %s", p.name, e)
        if isinstance(e, RpcError) and e.status in (429, 503):
            fleet.mark_busy(p, e.retry_after)
        elif not isinstance(e, RpcError) or e.code in GONE:
            fleet.peers.mark_down(p, str(e) or "race timed out")
    finally:
        await frames.aclose()
    return [], None
