"""Ranking nodes as pure functions (cluster/router/ranking.py): candidates,
ties, busy nodes, the group a node serves, race candidates, group URLs and
hard-migration destinations. No asyncio, no sockets."""

from __future__ import annotations

from mlxmoe.cluster.discovery import Peer
from mlxmoe.cluster.router import ranking as pl

SCORES = {0: 0.5, 1: 0.495, 2: 0.1}
RANKED = [0, 1, 2]


def peer(name: str, groups: list[int], active: int = 0, free: int = 0) -> Peer:
    return Peer(name=name, url=f"http://{name}:7420", source="static", groups=groups, active_sessions=active,
                free_memory=free, state="up")


def names(peers) -> list[str]:
    return [p.name for p in peers]


def rank(peers, **kw):
    kw = {"tie_margin": 0.02, "busy_until": {}, "now": 100.0, **kw}
    return pl.rank_candidates(peers, SCORES, RANKED, **kw)


def test_group_for_is_the_best_ranked_group_a_node_serves():
    assert pl.group_for([2, 0, 1], [0, 1]) == 0
    assert pl.group_for([2, 0, 1], [1, 2]) == 2
    assert pl.group_for([2, 0], [5, 0]) == 0  # an unscored group ranks last
    assert pl.group_for([2, 0], [5]) == 5


def test_candidates_by_group_rank_then_load():
    a, b, c = peer("a", [2]), peer("b", [1]), peer("c", [0], active=3)
    assert names(rank([a, b, c], tie_margin=0.0)) == ["c", "b", "a"]  # rank beats load without a tie
    assert names(rank([a, b, c])) == ["b", "c", "a"]  # 0 and 1 tie within the margin: least loaded first


def test_pinned_node_first_and_exclusions():
    a, b, c = peer("a", [2]), peer("b", [1]), peer("c", [0])
    assert names(rank([a, b, c], pinned="a")) == ["a", "b", "c"]
    assert names(rank([a, b, c], pinned="a", exclude={"a", "c"})) == ["b"]


def test_busy_nodes_go_last_until_their_retry_after():
    a, b = peer("a", [0]), peer("b", [2])
    assert names(rank([a, b], busy_until={"a": 101.0})) == ["b", "a"]
    assert names(rank([a, b], busy_until={"a": 99.0})) == ["a", "b"]  # expired


def test_unscored_group_ranks_after_every_scored_one():
    a, b = peer("a", [7]), peer("b", [2])
    assert names(rank([a, b])) == ["b", "a"]


def test_race_candidates_one_per_group_at_most_n():
    ps = [peer("a", [0]), peer("a2", [0]), peer("b", [1]), peer("c", [2])]
    assert names(pl.race_candidates(ps, RANKED, 3)) == ["a", "b", "c"]
    assert names(pl.race_candidates(ps, RANKED, 2)) == ["a", "b"]


def test_group_urls_least_loaded_not_busy_not_skipped():
    a, a2, b = peer("a", [0], active=2), peer("a2", [0]), peer("b", [1, 2])
    assert pl.group_urls([a, a2, b], {}, 0.0) == {"0": a2.url, "1": b.url, "2": b.url}
    assert pl.group_urls([a, a2, b], {"a2": 5.0}, 0.0)["0"] == a.url
    assert pl.group_urls([a, a2, b], {}, 0.0, skip="b") == {"0": a2.url}


def test_destinations_and_remote_peers():
    a, a2, b = peer("a", [0], active=2), peer("a2", [0]), peer("b", [1])
    assert names(pl.destinations([a, a2, b], 0, {}, 0.0)) == ["a2", "a"]
    assert names(pl.destinations([a, a2, b], 0, {}, 0.0, skip="a2")) == ["a"]
    assert pl.remote_peers({"0": "u0", "1": "u1", "2": "u2"}, [1]) == {"0": "u0", "2": "u2"}


# ---- load: what spreads work (docs/ARCHITECTURE.md, The router)

def loaded(name: str, groups: list[int], inflight: int = 0, streams: int = 0, queued: int = 0, **kw) -> Peer:
    p = peer(name, groups, **kw)
    p.inflight, p.streams, p.queued = inflight, streams, queued
    return p


def test_load_is_streams_running_or_waiting_then_sessions_then_memory():
    assert pl.load(loaded("a", [0], inflight=3)) < pl.load(loaded("b", [0], streams=2, queued=2))
    assert pl.load(loaded("a", [0], inflight=1, streams=1)) == (1, 0, 0, "a")  # our streams are in its count
    assert pl.load(loaded("a", [0], active=1)) > pl.load(loaded("b", [0], active=0))
    assert pl.load(loaded("a", [0], free=10)) < pl.load(loaded("b", [0], free=5))


def test_replicas_of_a_group_least_loaded_first():
    a, b, c = loaded("a", [0], inflight=2), loaded("b", [0], streams=1), loaded("c", [0], queued=3)
    assert names(rank([a, b, c])) == ["b", "a", "c"]
    assert names(rank([a, b, c], tie_margin=0.0)) == ["b", "a", "c"]  # replicas tie with no margin at all


def test_groups_within_the_margin_by_load_outside_by_score():
    busy0, idle1, idle2 = loaded("n0", [0], inflight=9), loaded("n1", [1]), loaded("n2", [2])
    assert names(rank([busy0, idle1, idle2])) == ["n1", "n0", "n2"]  # 0.5 and 0.495 tie: load decides
    # group 2 is 0.4 behind: load never moves it ahead, so a temperature-0 request stays on its group
    assert names(rank([busy0, idle2])) == ["n0", "n2"]
    assert names(rank([busy0, idle1, idle2], tie_margin=0.001)) == ["n0", "n1", "n2"]


def test_spreading_is_deterministic_for_equal_loads():
    ps = [loaded(n, [0]) for n in "cab"]
    assert names(rank(ps)) == names(rank(list(reversed(ps)))) == ["a", "b", "c"]


def test_concurrent_placements_spread_as_streams_open():
    """Each placement takes the first candidate and opens a stream on it
    (inflight += 1 at once): 9 quick placements over 3 replicas land 3 each."""
    ps = [loaded(n, [0]) for n in "abc"]
    for _ in range(9):
        rank(ps)[0].inflight += 1
    assert [p.inflight for p in ps] == [3, 3, 3]


def test_busy_node_is_not_down_while_it_streams_to_us():
    assert not pl.down_after_failed_probe("unreachable", streaming_at=99.0, now=100.0, grace=2.0)
    assert pl.down_after_failed_probe("unreachable", streaming_at=90.0, now=100.0, grace=2.0)  # silent too long
    assert pl.down_after_failed_probe("unreachable", streaming_at=None, now=100.0, grace=2.0)
    assert pl.down_after_failed_probe("unauthenticated", streaming_at=99.9, now=100.0, grace=2.0)


def test_tie_margin_is_a_router_setting():
    from mlxmoe.cluster.mobility import Mobility
    import pytest
    assert Mobility().tie_margin == 0.02 and Mobility.from_dict({"tie_margin": 0.1}).tie_margin == 0.1
    for bad in (-0.1, 2, "x", True):
        with pytest.raises(ValueError, match="router.tie_margin"):
            Mobility.from_dict({"tie_margin": bad})


def test_stalled_engine_is_down_busy_one_is_not():
    assert pl.stalled(301.0, 300.0) and not pl.stalled(12.0, 300.0)
    for junk in (None, "9999", True, [1], {"s": 1}):  # a node's info is data, not trusted types
        assert not pl.stalled(junk, 300.0)


def test_a_probe_timing_out_while_our_stream_prefills_is_busy_not_down():
    assert not pl.down_after_failed_probe("timeout", streaming_at=None, now=100.0, grace=2.0, inflight=1)
    assert pl.down_after_failed_probe("timeout", streaming_at=None, now=100.0, grace=2.0, inflight=0)
    assert pl.down_after_failed_probe("unreachable", streaming_at=None, now=100.0, grace=2.0, inflight=1)  # refused


def test_prefer_quality_keeps_the_best_node_and_speed_takes_the_least_loaded():
    scores = {0: 0.5, 1: 0.8, 2: 0.95}  # node c holds the largest set (a 3x budget): it serves best
    ranked = [2, 1, 0]
    ps = [loaded("a", [0]), loaded("b", [1]), loaded("c", [2], inflight=4)]
    assert pl.rank_candidates(ps, scores, ranked, 0.02, {}, 0.0)[0].name == "c"  # quality, whatever its load
    speed = pl.rank_candidates(ps, scores, ranked, 0.02, {}, 0.0, prefer="speed")
    assert [p.name for p in speed] == ["b", "a", "c"]  # the least loaded; among them, the better group
    assert pl.rank_candidates(ps, scores, ranked, 0.02, {"c": 10.0}, 0.0)[0].name == "b"  # full: spills to the next
