"""tools/quality_deep.py's pure parts: domain-balanced means with intervals,
the seen/unseen summaries, the depth study's masks and the best-layout pick."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
spec = importlib.util.spec_from_file_location("quality_deep", TOOLS / "quality_deep.py")
qd = importlib.util.module_from_spec(spec)
sys.modules["quality_deep"] = qd
spec.loader.exec_module(qd)


def test_balanced_means_domains_equally_and_brackets_the_point():
    doms = ["a", "a", "b", "b"]
    out = qd.balanced(doms, [1.0, 3.0, 10.0, 10.0], [1, 1, 2, 2])
    assert out["domains"]["a"]["value"] == pytest.approx(2.0)  # sum / sum, not a mean of ratios
    assert out["domains"]["b"]["value"] == pytest.approx(5.0)
    assert out["mean"]["value"] == pytest.approx(3.5)  # each domain counts once
    lo, hi = out["mean"]["ci"]
    assert lo <= 3.5 <= hi and out["domains"]["b"]["ci"] == pytest.approx([5.0, 5.0])


def test_balanced_exp_gives_perplexities():
    out = qd.balanced(["a", "b"], [math.log(4) * 3, 0.0], [3, 5], exp=True)
    assert out["domains"]["a"]["value"] == pytest.approx(4.0)
    assert out["domains"]["b"]["value"] == pytest.approx(1.0)
    assert out["mean"]["value"] == pytest.approx(2.5)


def test_summaries_keep_unseen_kinds_apart():
    rows = [{"domain": "code_go", "tokens": 4, "nll": 8.0, "kl": 0.4, "agree": 0.5},
            {"domain": "man_page", "tokens": 2, "nll": 2.0, "kl": 0.0, "agree": 1.0}]
    s = qd.summarize_rows(rows, {0: 4.0, 1: 2.0})
    assert set(s) == {"seen", "unseen"}
    assert list(s["seen"]["ppl"]["domains"]) == ["code_go"]
    assert s["seen"]["ppl_ratio"]["mean"]["value"] == pytest.approx(math.exp(1.0))
    assert s["seen"]["kl"]["mean"]["value"] == pytest.approx(0.1)
    assert s["unseen"]["ppl_ratio"]["mean"]["value"] == pytest.approx(1.0)
    assert s["unseen"]["agreement"]["mean"]["value"] == pytest.approx(1.0)
    plain = qd.summarize_rows([{k: v for k, v in rows[0].items() if k in ("domain", "tokens", "nll")}], {})
    assert set(plain["seen"]) == {"ppl"}  # an unmasked model has no ratio to itself


def test_depth_sets_mask_a_prefix_or_one_layer():
    layers = [0, 1, 2]
    sets = [{l: [0, 1] for l in layers}, {l: [2, 3] for l in layers}]
    pre = qd.depth_sets(sets, layers, 1, "prefix")
    assert pre[1] == {0: [2, 3], 1: [2, 3], 2: None}
    only = qd.depth_sets(sets, layers, 1, "only")
    assert only[0] == {0: None, 1: [0, 1], 2: None}
    assert qd.depth_sets(sets, layers, 2, "prefix") == sets


def test_best_budget_picks_the_lowest_seen_ratio_within_budget_and_a_real_placement():
    def r(name, placement, ratio, ppl_x):
        return {"config": name, "placement": placement, "mem_ratio": ratio,
                "summary": {"seen": {"ppl_ratio": {"mean": {"value": ppl_x}}}}}

    res = [r("a", "first", 1.5, 1.3), r("b", "first", 1.49, 1.2), r("b", "layers", 1.49, 1.1),
           r("c", "first", 2.0, 1.0), r("d", "oracle", 1.0, 1.0)]
    assert qd.best_budget(res) == ("b", "layers")  # over budget and the oracle bound are left out
