"""The quality meter at the router (cluster/router/meter.py): what a node
reports is taken only when it is a number in [0, 1] for a new turn, and the
turn-boundary decision re-places once, then splits, only after the meter stayed low."""

import math

import pytest

from mlxmoe.cluster.mobility import Mobility
from mlxmoe.cluster.router import meter
from mlxmoe.cluster.router.sessions import Session


def test_harvest_takes_new_turns_only():
    h, seen = meter.harvest([], 0, {"quality_meter": 0.8, "quality_meter_turns": 1})
    assert (h, seen) == ([0.8], 1)
    assert meter.harvest(h, seen, {"quality_meter": 0.5, "quality_meter_turns": 1}) == ([0.8], 1)  # same turn
    assert meter.harvest(h, seen, {"quality_meter": 0.5, "quality_meter_turns": 2}) == ([0.8, 0.5], 2)
    long = [0.9] * meter.KEEP
    assert len(meter.harvest(long, 1, {"quality_meter": 0.5, "quality_meter_turns": 2})[0]) == meter.KEEP


@pytest.mark.parametrize("st", [{}, {"quality_meter": "0.5", "quality_meter_turns": 2},
                                {"quality_meter": 1.5, "quality_meter_turns": 2},
                                {"quality_meter": -0.1, "quality_meter_turns": 2},
                                {"quality_meter": math.nan, "quality_meter_turns": 2},
                                {"quality_meter": True, "quality_meter_turns": 2},
                                {"quality_meter": 0.5, "quality_meter_turns": "2"},
                                {"quality_meter": 0.5, "quality_meter_turns": True},
                                {"quality_meter": 0.5}])
def test_harvest_ignores_hostile_values(st):
    assert meter.harvest([0.9], 1, st) == ([0.9], 1)


def test_action():
    low, high = [0.9, 0.5, 0.4], [0.5, 0.4, 0.95]
    assert meter.action(low, 0.0, 2, "pin", False, True) == "stay"  # off
    assert meter.action(high, 0.8, 2, "pin", False, True) == "stay"  # the last turn was fine
    assert meter.action([0.4], 0.8, 2, "pin", False, True) == "stay"  # not enough turns yet
    assert meter.action(low, 0.8, 2, "pin", False, True) == "replace"
    assert meter.action(low, 0.8, 2, "hard", True, True) == "split"
    assert meter.action(low, 0.8, 2, "pin", True, False) == "stay"  # no other group live to split with
    assert meter.action(low, 0.8, 2, "split", False, True) == "stay"  # already reaches other nodes


def test_mobility_validates_meter_settings():
    assert Mobility.from_dict({"meter_threshold": 0.85, "meter_checks": 3}).meter_threshold == 0.85
    for bad in ({"meter_threshold": 1.5}, {"meter_threshold": "high"}, {"meter_checks": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Mobility.from_dict(bad)


def test_session_status_shows_the_last_meter():
    s = Session(id="x", scores={0: 1.0}, ranked=[0], margin=1.0)
    assert s.status()["quality_meter"] is None
    s.meter = [0.7, 0.81]
    assert s.status()["quality_meter"] == 0.81
