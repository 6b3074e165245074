"""The quality meter at the router (cluster/router/quality_watch.py): what a node
reports is taken only when it is a number in [0, 1] for a new turn, and the
turn-boundary decision re-places once, then splits, only after the meter stayed low."""

import math

import pytest

from mlxmoe.cluster.mobility import Mobility
from mlxmoe.cluster.router import quality_watch
from mlxmoe.cluster.router.chats import Chat


def test_harvest_takes_new_turns_only():
    h, seen = quality_watch.harvest([], 0, {"quality_meter": 0.8, "quality_meter_turns": 1})
    assert (h, seen) == ([0.8], 1)
    assert quality_watch.harvest(h, seen, {"quality_meter": 0.5, "quality_meter_turns": 1}) == ([0.8], 1)  # same turn
    assert quality_watch.harvest(h, seen, {"quality_meter": 0.5, "quality_meter_turns": 2}) == ([0.8, 0.5], 2)
    long = [0.9] * quality_watch.KEEP
    assert len(quality_watch.harvest(long, 1, {"quality_meter": 0.5, "quality_meter_turns": 2})[0]) == quality_watch.KEEP


@pytest.mark.parametrize("st", [{}, {"quality_meter": "0.5", "quality_meter_turns": 2},
                                {"quality_meter": 1.5, "quality_meter_turns": 2},
                                {"quality_meter": -0.1, "quality_meter_turns": 2},
                                {"quality_meter": math.nan, "quality_meter_turns": 2},
                                {"quality_meter": True, "quality_meter_turns": 2},
                                {"quality_meter": 0.5, "quality_meter_turns": "2"},
                                {"quality_meter": 0.5, "quality_meter_turns": True},
                                {"quality_meter": 0.5}])
def test_harvest_ignores_hostile_values(st):
    assert quality_watch.harvest([0.9], 1, st) == ([0.9], 1)


def test_action():
    low, high = [0.9, 0.5, 0.4], [0.5, 0.4, 0.95]
    assert quality_watch.action(low, 0.0, 2, "pin", False, True) == "stay"  # off
    assert quality_watch.action(high, 0.8, 2, "pin", False, True) == "stay"  # the last turn was fine
    assert quality_watch.action([0.4], 0.8, 2, "pin", False, True) == "stay"  # not enough turns yet
    assert quality_watch.action(low, 0.8, 2, "pin", False, True) == "replace"
    assert quality_watch.action(low, 0.8, 2, "hard", True, True) == "split"
    assert quality_watch.action(low, 0.8, 2, "pin", True, False) == "stay"  # no other group live to split with
    assert quality_watch.action(low, 0.8, 2, "split", False, True) == "stay"  # already reaches other nodes


def test_mobility_validates_meter_settings():
    assert Mobility.from_dict({"meter_threshold": 0.85, "meter_checks": 3}).meter_threshold == 0.85
    for bad in ({"meter_threshold": 1.5}, {"meter_threshold": "high"}, {"meter_checks": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Mobility.from_dict(bad)


def test_session_status_shows_the_last_meter():
    s = Chat(id="x", scores={0: 1.0}, ranked=[0], margin=1.0)
    assert s.status()["quality_meter"] is None
    s.meter = [0.7, 0.81]
    assert s.status()["quality_meter"] == 0.81


def router(**mob):
    from mlxmoe.cluster.router.core import Router

    return Router(None, b"k" * 32, mdns=False, mobility={"meter_threshold": 0.8, "meter_checks": 2, **mob})


def test_router_harvests_the_pinned_nodes_meter_only():
    from mlxmoe.cluster.discovery import Peer

    r = router()
    s = Chat(id="sid", scores={0: 1.0}, ranked=[0], margin=1.0, peer="a", group=0)
    r.sessions.add(s)
    r._harvest(Peer("a", "http://a", "static"), {"session_stats": {"sid": {"quality_meter": 0.4, "quality_meter_turns": 1}}})
    r._harvest(Peer("b", "http://b", "static"), {"session_stats": {"sid": {"quality_meter": 0.9, "quality_meter_turns": 5}}})
    for bad in ({"session_stats": {"sid": {"quality_meter": "x", "quality_meter_turns": 2}}},
                {"session_stats": ["sid"]}, {"session_stats": {"sid": 3}}):
        r._harvest(Peer("a", "http://a", "static"), bad)
    assert s.meter == [0.4] and s.meter_seen == 1


def test_meter_turn_replaces_then_splits(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from mlxmoe.cluster.router import migration

    r = router()
    s = Chat(id="sid", scores={0: 1.0}, ranked=[0], margin=1.0, peer="a", group=0, meter=[0.5, 0.4])
    moved = []

    async def score(tokens):
        return SimpleNamespace(best=1), 0.0

    async def migrate(cx, sess, target, at):
        moved.append((target, at))
        return True

    monkeypatch.setattr(r, "score", score)
    monkeypatch.setattr(r.fleet, "group_urls", lambda skip=None: {"1": "http://b"})
    monkeypatch.setattr(migration, "migrate", migrate)
    asyncio.run(r.meter_turn(s, [1, 2, 3]))
    assert moved == [(1, "meter")] and s.meter_replaced and s.meter == [] and s.mode == "pin"
    s.meter = [0.3, 0.2]
    asyncio.run(r.meter_turn(s, [1, 2, 3]))
    assert s.mode == "split" and s.migrations[-1]["at"] == "meter" and moved == [(1, "meter")]
