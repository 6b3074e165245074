import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxmoe.bundle import cost
from mlxmoe.bundle.plan import resolve_counts
from mlxmoe.cli import main
from mlxmoe.errors import MlxMoeError

ROOT = Path(__file__).resolve().parents[2]
K = resolve_counts("qwen3-235b-a22b")[0]
W = cost.Weights(4, 8)
SHARES = cost.Shares(0.36, 0.65, "test")


def cluster(link="tb5", chip="m3-ultra", n=3, **dev):
    return cost.Cluster(n, cost.CHIPS[chip], cost.parse_link(link), replace(cost.device("apple"), **dev))


def rows(c, **kw):
    return {r["mode"]: r for r in cost.predict(K, W, c, SHARES, **kw)}


def test_links_and_chips_parse_or_name_the_option():
    assert cost.parse_link("10gbe") == cost.LINKS["10gbe"]
    custom = cost.parse_link("0.5,10")
    assert custom.rtt == pytest.approx(0.5e-3) and custom.bandwidth == pytest.approx(10e9 / 8) and custom.rdma_rtt is None
    for bad in ("fast", "1,0", "-1,10", ""):
        with pytest.raises(MlxMoeError, match="--link"):
            cost.parse_link(bad)
    with pytest.raises(MlxMoeError, match="--chip 'm9'"):
        cost.parse_chip("m9")


def test_pin_on_one_node_is_the_device_time_alone():
    c = cluster(n=1)
    r = rows(c)["pin"]
    assert r["decode_s"] == pytest.approx(cost.device_s(cost.step_bytes(K, W, 1024)["total"], K.n_layers, c.chip, c.dev))
    assert r["bytes_per_token"] == 0 and r["calls_per_token"] == 0


def test_remote_modes_pay_per_call_and_slow_with_the_link():
    fast, slow = rows(cluster("0.1,10")), rows(cluster("4,10"))
    for m in ("onehop", "split"):
        assert slow[m]["tok_s"] < fast[m]["tok_s"] < fast["pin"]["tok_s"]
    assert fast["split"]["calls_per_token"] == pytest.approx(0.65 * K.n_moe_layers)
    assert fast["split"]["bytes_per_token"] > fast["onehop"]["bytes_per_token"] > 0
    assert slow["pin"]["tok_s"] == fast["pin"]["tok_s"]  # pinned decoding never crosses the network


def test_peers_wire_and_latency_sensitivity():
    r = rows(cluster("tb5"))
    act = K.hidden * 2
    assert r["pipeline"]["bytes_per_token"] == (3 * 3 - 1) * act
    assert r["tensor"]["calls_per_token"] == 2 * K.n_layers
    assert r["tensor"]["tok_s"] > r["pipeline"]["tok_s"]  # RDMA: n-way bandwidth wins
    wifi = rows(cluster("wifi"))
    assert wifi["tensor"]["tok_s"] < wifi["pipeline"]["tok_s"] < wifi["pin"]["tok_s"]


def test_batch_touches_more_distinct_experts_but_never_more_than_all():
    one, three, many = (cost.step_bytes(K, W, 0, b)["experts"] for b in (1, 3, 10_000))
    per_expert_layer = one / (K.top_k * K.n_moe_layers)
    assert one < three < 3 * one
    assert many == pytest.approx(K.n_experts * K.n_moe_layers * per_expert_layer)


def test_hosts_sharing_cores_slow_concurrent_work_only():
    alone, shared = rows(cluster()), rows(cluster(parallel=1))
    assert shared["pin"]["tok_s"] == alone["pin"]["tok_s"]
    assert shared["pin"]["agg_tok_s"] == pytest.approx(alone["pin"]["agg_tok_s"] / 3)
    assert shared["tensor"]["tok_s"] < alone["tensor"]["tok_s"]


def test_shares_from_eval_report(tmp_path):
    s = cost.shares_from_eval(str(ROOT / "benchmarks/2026-11-24-cpu-split-onehop-domain-sets29-reference-moe.json"))
    assert 0 < s.onehop < s.split < 1
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(MlxMoeError, match="x.json: not an eval report"):
        cost.shares_from_eval(str(bad))


def test_calibration_file_matches_what_the_tools_wrote():
    """assets/cost.json and the anchors JSON come from tools/fit_cost.py: re-predicting
    each anchor with the shipped constants gives the recorded figure, within 30%."""
    anchors = sorted(ROOT.glob("benchmarks/cost-anchors-*.json"))[-1]
    rep = json.loads(anchors.read_text())
    assert cost.default_shares().split == rep["shares"]["split"]
    dev = cost.device("apple")
    for r in rep["rows"]:
        c = cost.Cluster(r["nodes"], cost.CHIPS[r["chip"]], cost.LINKS[r["link"]], dev, rdma=r["rdma"])
        p = cost.predict_mode(r["mode"], resolve_counts(r["model"])[0], cost.Weights(r["bits"], r["trunk_bits"]), c,
                              cost.default_shares(), context=512)["tok_s"]
        assert p == pytest.approx(r["predicted_tok_s"], abs=0.01)
        assert abs(r["error"]) <= 0.30, r


def test_cli_plan_with_chip_and_link():
    r = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--nodes", "3x192GB", "--chip", "m3-ultra", "--link", "tb5",
                                  "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)["cost"]
    assert [x["mode"] for x in c["rows"]] == list(cost.MODES) and c["chip"] == "m3-ultra" and c["nodes"] == 3
    r = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--link", "0.5,10"])
    assert r.exit_code == 0 and "mlx-lm tensor" in r.output and "over 0.5,10" in r.output
    r = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--link", "carrier-pigeon"])
    assert r.exit_code != 0 and "--link 'carrier-pigeon'" in r.output
