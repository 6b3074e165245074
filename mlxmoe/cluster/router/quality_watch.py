"""The router's watch over the nodes' live quality meter (docs/ARCHITECTURE.md,
"Quality meter"; the meter itself is model/meter.py's).

A node reports per session, in info()["session_stats"][id], `quality_meter`
(mean over the last turn's decoded tokens of the eligible share of the full
top-k router mass, model/meter.py) and `quality_meter_turns` (turns metered).
The router keeps the last values per session and, at a turn boundary, when the
meter has stayed below `meter_threshold` for `meter_checks` turns: first
re-places the chat (re-scores the transcript and moves it to the best group),
then, if it stays low, switches it to split routing (when another group has a
live node). Pure functions here; core.py calls them."""

from __future__ import annotations

import math

MOVABLE = ("pin", "soft", "hard")  # modes the meter may change; the per-layer modes already reach other nodes
KEEP = 8  # values kept per session


def harvest(history: list[float], seen: int, st: dict) -> tuple[list[float], int]:
    """(history, turns seen) after one node's session_stats entry `st`: a new
    turn's meter is appended; values that are not a number in [0, 1] (or no
    new turn) change nothing."""
    v, turns = st.get("quality_meter"), st.get("quality_meter_turns")
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0
          and isinstance(turns, int) and not isinstance(turns, bool) and turns > seen)
    if not ok:
        return history, seen
    return (history + [float(v)])[-KEEP:], turns


def action(history: list[float], threshold: float, checks: int, mode: str, replaced: bool, can_split: bool) -> str:
    """At a turn boundary: "stay", "replace" (re-place the chat once) or
    "split" (then switch it to split routing): the meter has been below
    `threshold` for the last `checks` turns. threshold 0 turns it off."""
    if threshold <= 0 or mode not in MOVABLE or len(history) < checks or max(history[-checks:]) >= threshold:
        return "stay"
    if not replaced:
        return "replace"
    return "split" if can_split else "stay"
