"""The router's guess of which node holds which prompt prefix (router/prefix_index.py) and its place in
ranking: among nodes that serve a chat equally well, the one holding more of its prompt goes first; a group
that leads by more than the tie margin still wins, and prefer="speed" keeps load first."""

from types import SimpleNamespace

from mlxmoe.cluster.router.prefix_index import BLOCK, PrefixIndex, block_hashes
from mlxmoe.cluster.router.ranking import rank_candidates


def peer(name, group, streams=0):
    return SimpleNamespace(name=name, url=f"http://{name}", groups=[group], inflight=0, streams=streams, queued=0,
                           active_sessions=0, free_memory=0)


def test_shared_counts_whole_blocks_of_the_longest_prefix_each_node_holds():
    system = list(range(3 * BLOCK + 10))
    ix = PrefixIndex()
    ix.record("a", system + [1, 2, 3])
    ix.record("b", system[:BLOCK + 5])
    assert ix.shared(system + [9, 9]) == {"a": 3 * BLOCK, "b": BLOCK}
    assert ix.shared(list(range(1000, 1200))) == {}
    assert ix.shared(system[:2 * BLOCK]) == {"a": BLOCK, "b": BLOCK}  # the last token is always computed
    assert block_hashes([1, 2] * BLOCK)[:1] == block_hashes([1, 2] * BLOCK + [5])[:1]
    ix.forget("a")
    assert ix.shared(system + [9]) == {"b": BLOCK}


def test_the_index_forgets_least_recently_used_blocks_per_node():
    ix = PrefixIndex(per_node=4)
    old, new = list(range(2 * BLOCK)), list(range(5000, 5000 + 4 * BLOCK))
    ix.record("a", old)
    ix.record("a", new)
    assert len(ix.nodes["a"]) == 4 and ix.shared(old + [1]) == {} and ix.shared(new + [1]) == {"a": 4 * BLOCK}


def test_ranking_prefers_the_node_with_the_prefix_among_equals_only():
    a, b, c = peer("a", 0), peer("b", 1, streams=2), peer("c", 2)
    scores, ranked = {0: 1.0, 1: 0.99, 2: 0.5}, [0, 1, 2]
    kw = dict(tie_margin=0.02, busy_until={}, now=0.0)
    assert [p.name for p in rank_candidates([a, b, c], scores, ranked, **kw)] == ["a", "b", "c"]
    shared = {"b": 1024, "c": 4096}
    assert [p.name for p in rank_candidates([a, b, c], scores, ranked, shared=shared, **kw)] == ["b", "a", "c"]
    speed = rank_candidates([a, b, c], scores, ranked, shared=shared, prefer="speed", **kw)
    assert [p.name for p in speed] == ["c", "a", "b"]  # load first; among the idle, c holds the prefix
