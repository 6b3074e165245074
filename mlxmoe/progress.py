"""Progress reporting for long commands (split, calibrate, eval, downloads).

API::

    from mlxmoe.progress import progress

    with progress(total_bytes, "Splitting experts", mode) as p:
        for chunk in work:
            ...
            p.advance(len(chunk))      # add bytes done
        p.update(done_bytes)           # or set the absolute amount done

- ``total_bytes``: int, or None when unknown (no ETA then).
- ``description``: short text shown before the bar / in the JSON lines.
- ``mode``:
    "bar"   a rich progress bar on stderr: binary sizes, MiB/s, ETA;
    "quiet" nothing at all;
    "json"  one JSON line per update on stderr, at most one every
            ``interval`` seconds (default 0.5) plus a final line on exit::

              {"event": "progress", "description": "...", "done": 123,
               "total": 456, "rate": 789.0, "elapsed": 1.2, "finished": false}

            ``rate`` is bytes/s since the start; ``finished`` is true on the
            last line only (also when the block raised).
- ``stream``: where to write (default sys.stderr), for tests.
- ``lazy``: start showing at the first update, so an error raised before any
  work (a library's validation) draws no 0% bar and no JSON line.

In "bar" mode a stream that is not a terminal (a file, a pipe, a CI log) gets
plain lines instead of bar redraws, which wrap there: one when the work
starts, at most one every ``PLAIN_INTERVAL`` seconds, one when it ends::

    split ref: 0.0/52.3 MiB
    split ref: 20.1/52.3 MiB (38%), 4.0 MiB/s
    split ref: done 52.3/52.3 MiB in 13.1s (4.0 MiB/s)

Everything goes to stderr so a command's stdout stays machine-readable.
Units need not be bytes (``unit="items"`` shows plain counts in bar mode).

A command's `--progress` option is the shared one in mlxmoe/commands/options.py.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator

MODES = ("bar", "quiet", "json")
PLAIN_INTERVAL = 10.0  # seconds between plain lines when stderr is not a terminal


class Progress:
    """Handle yielded by `progress()`; `advance`/`update` are all callers need."""

    def __init__(self, total: int | None, description: str, emit, interval: float, begin=None):
        self.total, self.description = total, description
        self.done = 0
        self.start = time.monotonic()
        self._emit, self._interval = emit, interval
        self._last_emit = float("-inf")
        self._begin = begin  # called once before the first emit; None: already begun
        self.begun = begin is None

    def open(self) -> None:
        if not self.begun:
            self.begun = True
            self.start = time.monotonic()
            self._begin(self)

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.open()
        self.done = done
        now = time.monotonic()
        if now - self._last_emit >= self._interval:
            self._last_emit = now
            self._emit(self, False)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0


def _json_emitter(stream: IO[str]):
    def emit(p: Progress, finished: bool) -> None:
        line = {"event": "progress", "description": p.description, "done": p.done, "total": p.total,
                "rate": round(p.rate, 1), "elapsed": round(time.monotonic() - p.start, 3), "finished": finished}
        stream.write(json.dumps(line) + "\n")
        stream.flush()
    return emit


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


@contextmanager
def progress(total_bytes: int | None, description: str, mode: str = "bar", *,
             stream: IO[str] | None = None, interval: float = 0.5, unit: str = "bytes",
             lazy: bool = False) -> Iterator[Progress]:
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
    stream = stream or sys.stderr
    if mode == "quiet":
        yield Progress(total_bytes, description, lambda p, f: None, float("inf"))
        return
    if mode == "json":
        emit = _json_emitter(stream)
        begin, end, every = (lambda p: None), (lambda p, ok: emit(p, True)), interval
    elif is_terminal(stream):
        begin, emit, end = _bar(stream, unit)
        every = 0.0  # rich redraws on its own timer, so every update can go straight through
    else:
        begin, emit, end = _lines(stream, unit)
        every = PLAIN_INTERVAL
    p = Progress(total_bytes, description, emit, every, begin)
    if not lazy:
        p.open()
    ok = False
    try:
        yield p
        ok = True
    finally:
        if p.begun:
            end(p, ok)


def _bar(stream, unit):
    """A rich bar that redraws in place (a terminal only)."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as RichProgress,
                               TaskProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn)

    sizes = [DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *sizes,
                       TimeRemainingColumn(), console=Console(file=stream), transient=False)
    task = []

    def begin(p):
        bar.start()
        task.append(bar.add_task(p.description, total=p.total))

    def emit(p, finished):
        bar.update(task[0], completed=p.done)

    def end(p, ok):
        if ok:
            bar.update(task[0], completed=p.done)
        bar.stop()
    return begin, emit, end


def _lines(stream, unit):
    """Plain lines for a file, pipe or CI log, where a bar's redraws would wrap."""
    def write(text):
        stream.write(text + "\n")
        stream.flush()

    def amount(p):
        if unit != "bytes":
            return f"{p.done}/{p.total}" if p.total is not None else f"{p.done}"
        return _sizes(p.done, p.total)

    def rate(p):
        return f"{_bytes(p.rate)}/s" if unit == "bytes" else f"{p.rate:.1f}/s"

    def emit(p, finished):
        pct = f" ({100 * p.done / p.total:.0f}%)" if p.total else ""
        write(f"{p.description}: {amount(p)}{pct}, {rate(p)}")

    def end(p, ok):
        took = time.monotonic() - p.start
        write(f"{p.description}: {'done' if ok else 'stopped at'} {amount(p)} in {took:.1f}s ({rate(p)})")
    def begin(p):
        write(f"{p.description}: {amount(p)}")
        p._last_emit = time.monotonic()  # the start line stands for the first periodic one

    return begin, emit, end


_UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"]


def _unit(n: float) -> tuple[float, str]:
    i = 0
    while n >= 1024 ** (i + 1) and i < len(_UNITS) - 1:
        i += 1
    return 1024 ** i, _UNITS[i]


def _bytes(n: float) -> str:
    scale, name = _unit(n)
    return f"{n:.0f} {name}" if scale == 1 else f"{n / scale:.1f} {name}"


def _sizes(done: int, total: int | None) -> str:
    """done/total in the total's unit, as rich's DownloadColumn shows it: 1.0/3.0 MiB."""
    if total is None:
        return _bytes(done)
    scale, name = _unit(total)
    if scale == 1:
        return f"{done}/{total} {name}"
    return f"{done / scale:.1f}/{total / scale:.1f} {name}"
