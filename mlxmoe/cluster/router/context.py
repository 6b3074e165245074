"""What a turn, its race and its migrations use of the router (turn.py,
race.py, migration.py): the fleet, the modes' settings, scoring on the front
end and the counters /status shows. They never see the Router itself, so none
of them imports core.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from mlxmoe.cluster.mobility import Mobility
from mlxmoe.cluster.router.fleet import Fleet

COUNTERS = ("requests", "failovers", "rejected", "migrations", "races")


@dataclass
class TurnContext:
    fleet: Fleet
    mob: Mobility
    score: Callable[[list[int]], Awaitable[tuple[Any, float]]]  # tokens -> (PlacementScores, ms), Router.score
    max_failovers: int = 3  # per turn
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))  # bumped by count() only
    tokens: int = 0  # tokens streamed to clients (Router.traffic)

    def count(self, name: str) -> None:
        self.counters[name] += 1
