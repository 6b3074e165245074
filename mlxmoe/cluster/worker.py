"""One thread per process drives the engine (MLX must not be driven from many
threads); asyncio code talks to it through futures and queues.

Streams are stepped in rounds, one token each, with plain calls (prefill,
close, ...) run in between, so concurrent sessions interleave instead of
queueing behind each other. A real node decodes a round's streams in one
batched step (node/batch.py): the first stream of a round to need a token
steps the batch, the others find theirs made (or yield PENDING: no token
this round, nothing delivered). At most `max_streams` are stepped at once; later
ones wait in order, not started (no KV held), so the node can say how deep
its queue is and refuse work past a bound (node_server.py).

Health must not wait on this thread (a busy node is not a dead one): the
worker keeps a cheap load snapshot (`load()`, plain ints read from any
thread) and, every `every` seconds while busy, the engine's own info
(`snapshot`), which the event loop serves without queueing a job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

from mlxmoe.node.contract import PENDING

END = object()
log = logging.getLogger("mlxmoe.worker")


class AsyncStream:
    """Async view of an iterator that runs on the worker thread. Yields its
    items; raises the iterator's exception, if any, at that point."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._q: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.iterator: Iterator | None = None
        self.make_iter: Callable[[], Iterator] | None = None  # until it starts (it may wait its turn)

    def _deliver(self, kind: str, value: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
            return True
        except RuntimeError:  # the loop is gone: nobody is listening
            return False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self._q.get()
        if kind == "item":
            return value
        if kind == "error":
            raise value
        raise StopAsyncIteration


class EngineWorker:
    def __init__(self, name: str = "mlxmoe-engine", max_streams: int | None = None):
        self.max_streams = max_streams  # streams stepped at once (None: all); the rest wait their turn
        self._jobs: queue.Queue = queue.Queue()
        self._streams: list[AsyncStream] = []
        self._waiting: collections.deque[AsyncStream] = collections.deque()
        self._stopped = False
        self._in_call = False
        self.last_step = 0.0  # time.time() of the last token round
        self.step_ms = 0.0  # how long that round took
        self.progress_at = time.time()  # the last job or token round that completed
        self.snapshot: dict | None = None  # latest snapshot_fn() result, taken on this thread
        self.snapshot_at = 0.0
        self._snapshot_fn: Callable[[], dict] | None = None
        self._snapshot_every = 0.5
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- asyncio side
    async def call(self, fn: Callable, *args) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put(("call", fn, args, loop, fut))
        return await fut

    def stream(self, make_iter: Callable[[], Iterator]) -> AsyncStream:
        s = AsyncStream(asyncio.get_running_loop())
        self._jobs.put(("stream", make_iter, s))
        return s

    def stop(self) -> None:
        self._stopped = True
        self._jobs.put(("stop",))

    def watch(self, fn: Callable[[], dict], every: float = 0.5) -> None:
        """Take `fn()` on this thread at most every `every` s while busy (and
        on request: refresh_snapshot) into `snapshot`, for health answers."""
        self._snapshot_fn, self._snapshot_every = fn, every

    def refresh_snapshot(self) -> dict | None:
        """Worker thread: take the snapshot now (submit it with call())."""
        if self._snapshot_fn is not None:
            try:
                self.snapshot = self._snapshot_fn()
            except Exception:  # health must not fail with the engine's bookkeeping
                log.exception("engine snapshot failed")
            self.snapshot_at = time.time()
        return self.snapshot

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after stop())."""
        self._thread.join(timeout)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def idle(self) -> bool:
        """Nothing running or queued: a call now is served at once."""
        return not (self._streams or self._waiting or self._in_call) and self._jobs.empty()

    def load(self) -> dict:
        """Plain numbers, safe to read from the event loop while the engine works."""
        busy = not self.idle
        return {"streams": len(self._streams), "queued": len(self._waiting) + self._jobs.qsize(), "busy": busy,
                "last_step": self.last_step, "step_ms": self.step_ms,
                "stalled_s": max(0.0, time.time() - self.progress_at) if busy else 0.0}

    # ---- worker thread
    def _run(self) -> None:
        while not self._stopped:
            try:
                job = self._jobs.get(block=not self._streams, timeout=None)
            except queue.Empty:
                job = None
            if job is not None:
                self.progress_at = time.time()  # waiting for work is not being stuck
                self._handle(job)  # pending jobs are drained before the next round of tokens
            else:
                if self._waiting and self._waiting[0].cancelled:
                    self._admit()  # drops streams whose caller left while they waited
                t0 = time.perf_counter()
                for s in list(self._streams):
                    self._step(s)
                self.step_ms, self.last_step = (time.perf_counter() - t0) * 1000, time.time()
            self.progress_at = time.time()
            if self._streams and time.time() - self.snapshot_at >= self._snapshot_every:
                self.refresh_snapshot()
        for s in self._streams + list(self._waiting):
            self._finish(s, "error", RuntimeError("engine worker stopped"))

    def _handle(self, job: tuple) -> None:
        if job[0] == "call":
            _, fn, args, loop, fut = job
            self._in_call = True
            try:
                result, err = fn(*args), None
            except BaseException as e:  # delivered to the caller, not lost in this thread
                result, err = None, e
            finally:
                self._in_call = False
            try:
                loop.call_soon_threadsafe(_settle, fut, result, err)
            except RuntimeError:
                pass
        elif job[0] == "stream":
            _, make_iter, s = job
            s.make_iter = make_iter
            self._waiting.append(s)
            self._admit()

    def _admit(self) -> None:
        """Start waiting streams, in order, while there is room."""
        while self._waiting and (self._waiting[0].cancelled or self.max_streams is None
                                 or len(self._streams) < self.max_streams):
            s = self._waiting.popleft()
            if s.cancelled:
                continue
            try:
                s.iterator = iter(s.make_iter())
                self._streams.append(s)
            except BaseException as e:
                s._deliver("error", e)
            s.make_iter = None

    def _step(self, s: AsyncStream) -> None:
        if s.cancelled:
            return self._finish(s, None, None)
        try:
            item = next(s.iterator)
        except StopIteration:
            return self._finish(s, "end", None)
        except BaseException as e:
            return self._finish(s, "error", e)
        if item is PENDING:
            return
        if not s._deliver("item", item):
            self._finish(s, None, None)

    def _finish(self, s: AsyncStream, kind: str | None, value: Any) -> None:
        if s in self._streams:
            self._streams.remove(s)
        if s in self._waiting:
            self._waiting.remove(s)
        close = getattr(s.iterator, "close", None)
        if close is not None:
            try:
                close()  # lets a generator release its session state now
            except Exception:
                pass
        if kind is not None:
            s._deliver(kind, value)
        if not self._stopped:
            self._admit()  # a slot is free: the next waiting stream starts


def _settle(fut: asyncio.Future, result: Any, err: BaseException | None) -> None:
    if fut.cancelled():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(result)


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM (how `mlxmoe node` and `mlxmoe serve` stop)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
