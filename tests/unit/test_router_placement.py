"""Placement as pure functions (cluster/router/placement.py): candidates,
ties, busy nodes, the group a node serves, race candidates, group URLs and
hard-migration destinations. No asyncio, no sockets."""

from __future__ import annotations

from mlxmoe.cluster.discovery import Peer
from mlxmoe.cluster.router import placement as pl

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
