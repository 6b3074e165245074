"""One request's generation on the cluster, possibly spanning nodes: it
connects to the session's best candidate, streams token frames, fails over
mid-stream from the transcript (prompt + tokens already sent, with the
remaining max_tokens: the client sees every token exactly once), and, in
soft/hard mode, re-checks the session's group every `check_every` tokens.

Every continuation (failover, migration, after a race) is an exact splice
(docs/ARCHITECTURE.md): the node is told how many of the prompt's tokens are
this turn's output and how many characters of their text were delivered, and
resumes the turn's detokenizer and stop strings from there (node/stream.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

from mlxmoe.cluster.discovery import Peer
from mlxmoe.cluster.router import migration
from mlxmoe.cluster.router.chats import Chat
from mlxmoe.cluster.router.context import TurnContext
from mlxmoe.cluster.router.race import race
from mlxmoe.cluster.sessionview import tok_s
from mlxmoe.errors import MlxMoeError, RpcError
from mlxmoe.modes import MIGRATING
from mlxmoe.params import GenParams

log = logging.getLogger("mlxmoe.router")
BUSY_WAIT_S = 5.0  # how long a reconnect waits for our own stream on that node to wind down


class Rejected(MlxMoeError):
    """No node can take the request now: 429 "overloaded" (every candidate is
    full) or 503 "no_nodes", with Retry-After seconds."""

    def __init__(self, status: int, message: str, retry_after: float):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.code = "overloaded" if status == 429 else "no_nodes"


def splice_params(params: GenParams, n_generated: int, sent_chars: int) -> GenParams:
    """Generate params continuing a turn of which `n_generated` tokens (and
    `sent_chars` characters of their text) already reached the client."""
    if not n_generated:  # a first connect is what it always was
        return params
    return params.edit(max_tokens=params.max_tokens - n_generated, resume=n_generated, resume_chars=sent_chars)


class Turn:
    """One request's generation, possibly spanning nodes after failovers."""

    def __init__(self, cx: TurnContext, s: Chat, prompt: list[int], params: GenParams, *,
                 on_end: Callable[[Chat, list[int]], None], deterministic: bool = False):
        """on_end(chat, context): the router's bookkeeping once the turn is over (Router.end_turn);
        deterministic: the request gets reproducible text, so placement never spreads it (ranking.py)."""
        self.cx, self.fleet, self.s, self.prompt, self.params = cx, cx.fleet, s, list(prompt), params
        self.on_end, self.deterministic = on_end, deterministic
        self.generated: list[int] = []
        self.sent_chars = 0  # characters of text delivered for `generated` (the splice point)
        self.finish_reason: str | None = None
        self.tried: set[str] = set()
        self.failovers = 0
        self.peer_retries = 0
        self._frames: AsyncIterator[dict] | None = None
        self._first: dict | None = None
        self._queued: list[dict] = []  # race winner's frames, already in `generated`
        self._closed = False
        self.without: set[int] = set()  # groups whose experts some of this turn's tokens ran without
        self.started = time.time()
        self.first_at: float | None = None  # first token's arrival (TTFT = first_at - started)
        self.ended_at: float | None = None
        s.start_turn(len(self.prompt))

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.params.max_tokens or self.finish_reason == "stop"

    async def connect(self, first: bool = False, migrated: bool = False) -> None:
        fleet, s = self.fleet, self.s
        params = splice_params(self.params, len(self.generated), self.sent_chars)
        prompt = self.prompt + self.generated
        retry_after, last_err = None, None
        for p in fleet.candidates(s, self.tried, self.deterministic):
            self.tried.add(p.name)
            try:
                frames, first_frame = await self._start(p, prompt, params)
            except asyncio.TimeoutError:
                if await fleet.first_token_late(p):  # busy (its health answers), not down: the client may retry
                    retry_after = min(retry_after or 1e9, 2)
                continue
            except RpcError as e:
                last_err = e
                if e.status in (429, 503):
                    fleet.mark_busy(p, e.retry_after)
                    retry_after = min(retry_after or 1e9, e.retry_after or 2)
                    continue
                if e.retryable:
                    fleet.failed(p, e)
                    continue
                raise  # the request itself is bad (e.g. context overflow): same on every node
            moved = s.peer is not None and s.peer != p.name
            if (moved or not first) and not (migrated and not moved):
                self.failovers += 1
                self.cx.count("failovers")
                log.warning("session %s moved from %s to %s (%s)", s.id, s.peer, p.name,
                            last_err.message if last_err else "pinned node not available")
            if s.peer != p.name:
                p.active_sessions += 1  # until the next probe says better: spreads quick placements
            s.peer, s.group = p.name, fleet.group_for(s, p)
            self._frames, self._first = frames, first_frame
            self.without |= set(s.without)
            return
        self.cx.count("rejected")
        if retry_after is not None:
            raise Rejected(429, "every node that could serve this conversation is full; retry shortly",
                           retry_after)
        if last_err is not None and not first:
            raise last_err
        raise Rejected(503, "no node is up to serve this conversation"
                       + (f" (last error: {last_err.message})" if last_err else
                          ": start `mlxmoe node` on your Macs (or list them in --peers)"), 5)

    async def _start(self, p: Peer, prompt: list[int], params: GenParams) -> tuple[AsyncIterator[dict], dict | None]:
        """Start generating on `p`: (frames, first frame or None). A failed
        remote-expert peer gets one retry on the same node, routed without it."""
        fleet, s = self.fleet, self.s
        attempt, busy_until = 0, time.monotonic() + BUSY_WAIT_S
        while True:
            frames = fleet.client(p).generate(s.id, prompt, fleet.node_params(s, p, params),
                                              token_timeout=fleet.token_timeout)
            try:
                return frames, await asyncio.wait_for(frames.__anext__(), fleet.first_token_timeout)
            except StopAsyncIteration:
                return frames, None
            except RpcError as e:
                await frames.aclose()
                if e.code == "session_busy" and time.monotonic() < busy_until:
                    # our own stream on that node is still winding down (a soft switch or a
                    # reconnect right after we closed it): its cache settles in a moment
                    await asyncio.sleep(0.05)
                    continue
                if e.code != "peer_failed" or attempt:
                    raise
                attempt += 1
                await migration.peer_failed(fleet, s, e)
            except asyncio.TimeoutError:
                await frames.aclose()
                raise

    async def race(self) -> None:
        """Race placement (race.py); the winner's K tokens become this turn's first."""
        won = await race(self.cx, self.s, self.prompt, self.params)
        if won is None:
            return  # nothing to race, or every run failed: plain placement
        toks, end = won
        self._queued = toks
        self.generated = [int(f["token"]) for f in toks]
        self.sent_chars = sum(len(f.get("text") or "") for f in toks)
        self.finish_reason = end or toks[-1].get("finish_reason")
        if self.finish_reason == "length" and len(self.generated) < self.params.max_tokens:
            self.finish_reason = None  # only the race's K tokens ran out: the answer goes on

    async def events(self) -> AsyncIterator[dict]:
        """Token frames {"token","text","logprob","finish_reason"} across failovers."""
        try:
            for f in self._queued:  # race winner: already counted in `generated`
                self.cx.tokens += 1
                self._got()
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
                        self.sent_chars += len(f.get("text") or "")
                        self.cx.tokens += 1
                        self._got()
                        self.finish_reason = f.get("finish_reason")
                        yield f
                        if await self._maybe_recheck():
                            break  # reconnect with the new routing (the cache prefix is reused)
                    else:
                        return
                except RpcError as e:
                    if e.code == "peer_failed" and self.peer_retries < 2:
                        self.peer_retries += 1  # the node is fine, a peer it called is not: same node, new routing
                        await migration.peer_failed(self.fleet, self.s, e)
                        self.tried.discard(self.s.peer)
                    elif not e.retryable or self.failovers >= self.cx.max_failovers:
                        raise
                    self.fleet.failed(self.fleet.peer(self.s.peer), e)
                    migrated = e.code == "peer_failed"
                    if len(self.generated) >= self.params.max_tokens or self.finish_reason:
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

    def _got(self) -> None:
        if self.first_at is None:
            self.first_at = time.time()
        self.s.got_token()

    def notice(self) -> dict | None:
        """What the client is told beside the answer (the final chunk's `mlxmoe`): groups whose
        experts part of it ran without (onehop/split, no live node of theirs)."""
        if not self.without:
            return None
        return {"without_groups": sorted(self.without),
                "note": f"part of this answer ran without the experts of group(s) {sorted(self.without)}: "
                        "no live node serves them"}

    def stats(self) -> dict:
        """This turn for the access log: session ref, node, group, tokens, TTFT, tok/s."""
        end = self.ended_at or time.time()
        ttft = None if self.first_at is None else round(self.first_at - self.started, 4)
        return {"session": self.s.ref, "node": self.s.peer, "group": self.s.group, "mode": self.s.mode,
                "prompt_tokens": len(self.prompt), "completion_tokens": len(self.generated), "ttft_s": ttft,
                "tok_s": tok_s(len(self.generated), self.first_at, end), "finish_reason": self.finish_reason,
                "failovers": self.failovers}

    async def _maybe_recheck(self) -> bool:
        """Every `check_every` tokens (soft/hard): re-score; if the session
        migrated, close this stream so the caller reconnects."""
        cx, s, n = self.cx, self.s, len(self.generated)
        if not cx.mob.check_every or s.mode not in MIGRATING or n % cx.mob.check_every or self.finish_reason:
            return False
        s.context = self.prompt + self.generated
        target = await migration.decide(cx, s, s.context, f"token {n}")
        if target is None:
            return False
        await self._close_frames()  # the node stops this stream before its session is exported
        await migration.migrate(cx, s, target, f"token {n}")  # if it fails, the session goes on as it was
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
        self.ended_at = time.time()
        await self._close_frames()
        self.on_end(self.s, self.prompt + self.generated)
