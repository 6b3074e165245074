"""Race placement (mode race): the best node of each of the top groups
generates `race_tokens` tokens of the first answer; the best mean log-prob
is pinned and its tokens kept, the others' sessions closed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from mlxmoe.cluster.discovery import Peer
from mlxmoe.cluster.router.placement import GONE
from mlxmoe.cluster.router.sessions import Session
from mlxmoe.errors import RpcError

if TYPE_CHECKING:
    from mlxmoe.cluster.router.core import Router

log = logging.getLogger("mlxmoe.router")


async def race(r: Router, s: Session, prompt: list[int], params: dict) -> tuple[list[dict], str | None] | None:
    """Run the race and pin the winner: (its token frames, finish reason),
    or None when there was nothing to race or every run failed (then plain
    placement goes on)."""
    cands = r.race_candidates(s)
    if len(cands) < 2:
        return None
    k = min(r.mob.race_tokens, params["max_tokens"])
    t0 = time.perf_counter()
    capped = {**params, "max_tokens": k, **({"open_end": True} if k < params["max_tokens"] else {})}  # exact splice
    runs = await asyncio.gather(*(run_one(r, s, p, prompt, capped) for p in cands))
    means = [sum(f["logprob"] for f in toks) / len(toks) if toks else None for toks, _ in runs]
    ok = [i for i, m in enumerate(means) if m is not None]
    w = max(ok, key=lambda j: means[j]) if ok else None  # first (best-scored) wins a tie
    for i, p in enumerate(cands):
        if i != w:
            r.close_later(s.id, p.name)  # losers (and failed runs) drop their caches
    if w is None:
        return None
    win = cands[w]
    s.peer, s.group = win.name, r.group_for(s, win)
    win.active_sessions += 1
    s.race = {"winner": s.group, "node": win.name, "tokens": k, "ms": round((time.perf_counter() - t0) * 1e3, 1),
              "mean_logprob": {str(r.group_for(s, p)): None if m is None else round(m, 4)
                               for p, m in zip(cands, means)}}
    r.count("races")
    return runs[w]


async def run_one(r: Router, s: Session, p: Peer, prompt: list[int], params: dict) -> tuple[list[dict], str | None]:
    """(token frames, finish reason) of K tokens from `p`; ([], None) if it failed."""
    toks = []
    frames = r.client(p).generate(s.id, prompt, r.node_params(s, p, params), token_timeout=r.token_timeout)
    try:
        async with asyncio.timeout(r.first_token_timeout):
            async for f in frames:
                if f["t"] == "end":
                    return toks, f.get("finish_reason")
                toks.append(f)
    except (RpcError, TimeoutError) as e:
        log.warning("race: node %s failed: %s", p.name, e)
        if isinstance(e, RpcError) and e.status in (429, 503):
            r.mark_busy(p, e.retry_after)
        elif not isinstance(e, RpcError) or e.code in GONE:
            r.peers.mark_down(p, str(e) or "race timed out")
    finally:
        await frames.aclose()
    return [], None
