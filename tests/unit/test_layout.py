"""Layouts for unequal Macs (quality/layout.py): budgets, per-layer allocation, node sets and
coverage as pure functions; then `calibrate --budgets` end to end on a tiny checkpoint."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxmoe.bundle.manifest import Manifest
from mlxmoe.errors import MlxMoeError
from mlxmoe.quality import layout as lo


def test_budgets_parse_ratios_and_sizes():
    assert lo.parse_budgets("1x,1.5x,3x") == [("ratio", 1.0), ("ratio", 1.5), ("ratio", 3.0)]
    assert lo.parse_budgets("24GB, 64GB") == [("bytes", 24e9), ("bytes", 64e9)]
    for bad in ("", "fast", "1.5y,2x"):
        with pytest.raises(MlxMoeError, match="--budgets"):
            lo.parse_budgets(bad)


def test_node_slots_from_shares_and_memory():
    # 3 nodes, 4 layers of 12 experts of 1 MB, trunk 10 MB: a plain share is 10 + 4 * 4 = 26 MB
    kw = dict(n_experts=12, n_layers=4, expert_bytes=1e6, trunk_bytes=10e6)
    assert lo.node_slots([("ratio", 1.0), ("ratio", 1.5), ("ratio", 9.0)], **kw) == [16, 29, 48]  # 48 = every expert
    # bytes: 75% usable, less KV and the trunk
    assert lo.node_slots([("bytes", 40e6)], **kw, kv_bytes=2e6) == [18]
    with pytest.raises(MlxMoeError, match="fewer than top_k=2 per layer"):
        lo.node_slots([("bytes", 16e6)], **kw, top_k=2)


def test_allocation_makes_the_costly_layer_whole_first():
    costs = {0: 0.47, 1: 0.01, 2: 0.01, 3: 0.005}  # the deep family's shape: the loss sits in the first layer
    size = lo.allocate(40, costs, 20, 2)  # 1.5x a plain third of 4 layers x 20 experts
    assert size[0] == 20 and sum(size.values()) == 40 and all(size[l] >= 2 for l in costs)
    even = lo.allocate(40, {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.1}, 20, 2)
    assert sorted(even.values()) == [10, 10, 10, 10]  # equal costs: equal shares
    assert lo.allocate(80, costs, 20, 2) == {l: 20 for l in costs}  # a budget that holds every expert: all


def test_node_sets_follow_each_nodes_traffic_and_cover_every_expert():
    E, layers = 8, [0]
    wants = [np.array([[8, 7, 6, 5, 1, 1, 1, 1]], float), np.array([[1, 1, 1, 1, 8, 7, 6, 5]], float)]
    mass = np.ones((1, E))
    sets, left = lo.node_sets([{0: 3}, {0: 5}], wants, mass, layers)
    assert set(sets[0][0]) | set(sets[1][0]) == set(range(E)) and not left  # 3 + 5 = 8: everything, once
    assert {4, 5, 6} <= set(sets[1][0]) and {1, 2} <= set(sets[0][0])
    small, left = lo.node_sets([{0: 2}, {0: 3}], wants, np.array([[5, 4, 3, 2, 1, 6, 7, 0.5]]), layers)
    assert left == {0: sorted(set(range(E)) - set(small[0][0]) - set(small[1][0]))} and len(left[0]) == 3
    assert 7 in left[0]  # the least used are the ones left out


def test_grouping_puts_what_every_node_holds_in_the_overlay_and_scores_after_whole_layers():
    sets = [{0: list(range(8)), 1: [0, 1, 2]}, {0: list(range(8)), 1: [2, 3, 4, 5, 6, 7]}]
    g, ov = lo.layout_grouping(sets, [0, 1], 8, [{"budget": "1x"}, {"budget": "2x"}], {})
    assert ov["layers"] == {"0": list(range(8)), "1": [2]}
    assert g["layers"] == {"0": [[], []], "1": [[0, 1], [3, 4, 5, 6, 7]]}
    assert g["placement"] == {"layers": [1], "whole": [0]} and g["overlap"] and "left_out" not in g


@pytest.fixture(scope="module")
def layout_bundle(tmp_path_factory):
    return tiny.make_layout(tmp_path_factory.mktemp("layout"))


def test_calibrate_budgets_writes_one_set_per_node_sized_to_its_budget(layout_bundle):
    b, lay = layout_bundle
    m = Manifest.load(b)
    assert m.n_groups == 3 and m.grouping["strategy"] == "layout"
    held = [sum(len(m.eligible(g, l)) for l in m.moe_layers) for g in range(3)]
    assert held[0] < held[1] < held[2] == m.n_experts * len(m.moe_layers)  # 2x holds every expert (a small trunk)
    assert [n["experts"] for n in lay["nodes"]] == held and lay["nodes"][2]["full_model"]
    assert lay["coverage"] == 1.0 and lay["held_out_passages"] > 0 and set(lay["layer_costs"]) == {"0", "1", "2"}
    q = [n["held_out"]["mean"]["kl"] for n in lay["nodes"]]
    assert q[2] < 1e-4  # the exact model
    assert lay["nodes"][2]["held_out"]["mean"]["ppl_ratio"] == pytest.approx(1.0, abs=2e-3)


def test_the_full_budget_node_is_the_full_model_and_the_router_scores_after_whole_layers(layout_bundle):
    from mlxmoe.model.load import load_bundle
    from mlxmoe.node.trunk import TrunkFrontend

    b, _ = layout_bundle
    ids = mx.array([[3, 17, 99, 250, 7, 42]])
    full, node2 = load_bundle(b, None), load_bundle(b, 2)
    assert mx.abs(full.model(ids) - node2.model(ids)).max().item() < 1e-5
    front = TrunkFrontend.load(b)
    m = front.manifest
    sc = front.score([3, 17, 99, 250, 7, 42])
    assert sc.layers == m.placement_layers() and sorted(sc.scores) == [0, 1, 2]
    assert sc.scores[2] >= max(sc.scores[0], sc.scores[1])  # the node holding every expert serves it best


def test_whole_layers_are_made_whole_first_as_far_as_every_node_can():
    costs = {0: 0.4, 1: 0.13, 2: 0.09, 3: 0.09, 4: 0.08, 5: 0.09}  # the reference model's measured costs
    size = lo.allocate(173, costs, 48, 6, whole=1)
    assert size[0] == 48 and sum(size.values()) == 173 and min(size.values()) >= 6
    two = lo.allocate(173, costs, 48, 6, whole=2)
    assert two[0] == two[1] == 48 and sum(two.values()) == 173
    assert lo.whole_candidates([173, 173, 173], costs, 48, 6) == [0, 1, 2, 3]
    assert lo.whole_candidates([40, 300], costs, 48, 6) == [0]  # the smallest node has no room for one


def test_a_joining_mac_takes_what_the_others_lack_first():
    first = lo.grow([], 10, [0, 1], 8, 2)
    assert first == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}  # contiguous while nothing is calibrated
    second = lo.grow([first], 8, [0, 1], 8, 2)
    assert second == {0: [0, 5, 6, 7], 1: [0, 5, 6, 7]}  # the uncovered first
    assert lo.left_out([first, second], [0, 1], 8) == {}
    assert lo.left_out([first], [0, 1], 8) == {0: [5, 6, 7], 1: [5, 6, 7]}
    assert lo.grow([], 100, [0, 1], 8, 2) == {0: list(range(8)), 1: list(range(8))}  # every expert
