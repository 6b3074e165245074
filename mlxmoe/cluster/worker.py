"""One thread per process drives the engine (MLX must not be driven from many
threads); asyncio code talks to it through futures and queues.

Streams are stepped round-robin, one token each, with plain calls (info,
close, ...) run in between, so concurrent sessions interleave instead of
queueing behind each other.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Iterator

END = object()


class AsyncStream:
    """Async view of an iterator that runs on the worker thread. Yields its
    items; raises the iterator's exception, if any, at that point."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._q: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.iterator: Iterator | None = None

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
    def __init__(self, name: str = "mlxmoe-engine"):
        self._jobs: queue.Queue = queue.Queue()
        self._streams: list[AsyncStream] = []
        self._stopped = False
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

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after stop())."""
        self._thread.join(timeout)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # ---- worker thread
    def _run(self) -> None:
        while not self._stopped:
            try:
                job = self._jobs.get(block=not self._streams, timeout=None)
            except queue.Empty:
                job = None
            if job is not None:
                self._handle(job)
                continue  # drain pending jobs before the next round of tokens
            for s in list(self._streams):
                self._step(s)
        for s in self._streams:
            self._finish(s, "error", RuntimeError("engine worker stopped"))

    def _handle(self, job: tuple) -> None:
        if job[0] == "call":
            _, fn, args, loop, fut = job
            try:
                result, err = fn(*args), None
            except BaseException as e:  # delivered to the caller, not lost in this thread
                result, err = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, err)
            except RuntimeError:
                pass
        elif job[0] == "stream":
            _, make_iter, s = job
            try:
                s.iterator = iter(make_iter())
                self._streams.append(s)
            except BaseException as e:
                s._deliver("error", e)

    def _step(self, s: AsyncStream) -> None:
        if s.cancelled:
            return self._finish(s, None, None)
        try:
            item = next(s.iterator)
        except StopIteration:
            return self._finish(s, "end", None)
        except BaseException as e:
            return self._finish(s, "error", e)
        if not s._deliver("item", item):
            self._finish(s, None, None)

    def _finish(self, s: AsyncStream, kind: str | None, value: Any) -> None:
        if s in self._streams:
            self._streams.remove(s)
        close = getattr(s.iterator, "close", None)
        if close is not None:
            try:
                close()  # lets a generator release its session state now
            except Exception:
                pass
        if kind is not None:
            s._deliver(kind, value)


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
