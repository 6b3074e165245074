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


class Progress:
    """Handle yielded by `progress()`; `advance`/`update` are all callers need."""

    def __init__(self, total: int | None, description: str, emit, interval: float):
        self.total, self.description = total, description
        self.done = 0
        self.start = time.monotonic()
        self._emit, self._interval = emit, interval
        self._last_emit = float("-inf")

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
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


@contextmanager
def progress(total_bytes: int | None, description: str, mode: str = "bar", *,
             stream: IO[str] | None = None, interval: float = 0.5, unit: str = "bytes") -> Iterator[Progress]:
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
    stream = stream or sys.stderr
    if mode == "quiet":
        p = Progress(total_bytes, description, lambda p, f: None, float("inf"))
        yield p
    elif mode == "json":
        emit = _json_emitter(stream)
        p = Progress(total_bytes, description, emit, interval)
        try:
            yield p
        finally:
            emit(p, True)
    else:
        yield from _bar(total_bytes, description, stream, unit)


def _bar(total, description, stream, unit):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as RichProgress,
                               TaskProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn)

    sizes = [DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *sizes,
                       TimeRemainingColumn(), console=Console(file=stream), transient=False)
    with bar:
        task = bar.add_task(description, total=total)
        # rich redraws on its own timer, so every update can go straight through.
        p = Progress(total, description, lambda p, f: bar.update(task, completed=p.done), 0.0)
        yield p
        bar.update(task, completed=p.done)
