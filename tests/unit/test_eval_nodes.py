"""Quality per node, known: `mlxmoe eval` measures each node of the bundle with
every chat pinned to it; a layout bundle (`calibrate --budgets`) carries each
node's held-out quality for `plan` and the router."""

import json

import pytest
from click.testing import CliRunner

from mlxmoe.bundle.manifest import TRUNK_FILE, Manifest
from mlxmoe.bundle.split import split
from mlxmoe.cli import main
from mlxmoe.quality import eval as q

WORDS = {
    "code": "def f ( x ) : return x + 1 for i in range ( 10 ) : print ( i ) if x else None".split(),
    "prose": "the quick brown fox jumps over the lazy dog and runs far away into the woods".split(),
    "numbers": "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24".split(),
}
BUDGETS = [("ratio", 1.0), ("ratio", 1.5), ("ratio", 3.0)]


def write_layout_suite(path, per_domain: int = 5):
    """Three domains, `per_domain` passages each (calibrate holds every fifth out)."""
    with open(path, "w") as f:
        for dom, words in WORDS.items():
            for i in range(per_domain):
                f.write(json.dumps({"domain": dom, "text": " ".join(words[i:] + words[:i]) * 2}) + "\n")
    return path


@pytest.fixture(scope="module")
def layout_bundle(ckpt, tmp_path_factory):
    """(layout bundle made with budgets 1x,1.5x,3x, its suite)."""
    from mlxmoe.quality.calibrate import calibrate

    d = tmp_path_factory.mktemp("layout")
    split(str(ckpt("qwen3_moe")), d / "b", 2, bits=None, trunk_bits=None)
    suite = write_layout_suite(d / "suite.jsonl")
    calibrate(d / "b", [str(suite)], out=d / "lay", budgets=BUDGETS)
    return d / "lay", suite


def test_eval_nodes_of_a_layout(layout_bundle):
    b, suite = layout_bundle
    m = Manifest.load(b)
    rep = q.run_eval(b, [str(suite)], placements=("first",), prompt_tokens=8, race_tokens=4)
    nodes = rep["nodes"]
    assert [nd["group"] for nd in nodes] == [0, 1, 2]
    for nd, lay in zip(nodes, m.grouping["nodes"]):
        assert nd["bytes"] == lay["bytes"] and nd["mem_ratio"] == pytest.approx(lay["mem_ratio"])
        assert nd["full_model"] == lay["full_model"] and nd["budget"] == lay["budget"]
        assert nd["mean"]["kl"] >= -1e-6 and 0 <= nd["mean"]["agreement"] <= 1 and nd["mean"]["ppl_ratio"] > 0
        assert set(nd["domains"]) == set(WORDS)
        for k in ("kl", "agreement", "ppl_ratio", "capture"):
            lo, hi = nd["intervals"][k]
            assert lo - 1e-9 <= nd["mean"][k] <= hi + 1e-9, (k, nd["mean"][k], lo, hi)
    full = [nd for nd in nodes if nd["full_model"]]
    assert full, "a 3x node holds every expert"
    for nd in full:
        assert nd["mean"]["kl"] < 1e-5 and nd["worst"]["ppl_ratio"] <= 1.002 and nd["mean"]["ppl_ratio"] <= 1.002
        assert nd["mean"]["agreement"] == 1.0 and nd["mean"]["capture"] == pytest.approx(1.0)
    # bigger sets do not do worse on average (KL; the ppl ratio of a near-exact node may dip below 1)
    assert nodes[0]["bytes"] < nodes[1]["bytes"] < nodes[2]["bytes"]
    kls = [nd["mean"]["kl"] for nd in nodes]
    assert kls[0] >= kls[1] - 1e-6 >= kls[2] - 2e-6, kls


def test_eval_nodes_of_a_grouping_json_and_table(ckpt, tmp_path):
    from test_quality import write_suite

    split(str(ckpt("qwen3_moe")), tmp_path / "b", 2, bits=None, trunk_bits=None)
    suite = write_suite(tmp_path / "suite.jsonl")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "b"), "--suite", str(suite), "--prompt-tokens", "8",
                                  "--placement", "first,oracle", "--json", "--progress", "quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    m = Manifest.load(tmp_path / "b")
    trunk, per = m.files[TRUNK_FILE]["size"], m.expert_bytes()
    own = next(x for x in rep["results"] if x["config"] == "g2/bundle")
    assert len(rep["nodes"]) == 2
    for g, nd in enumerate(rep["nodes"]):
        held = sum(len(m.eligible(g, l)) for l in m.moe_layers)
        assert nd["experts"] == held and not nd["full_model"]
        assert nd["bytes"] == int(trunk + per * held) and nd["mean"]["kl"] > 0
    assert max(nd["bytes"] for nd in rep["nodes"]) == own["node_bytes"]
    assert max(nd["mem_ratio"] for nd in rep["nodes"]) == pytest.approx(own["mem_ratio"], abs=1e-4)
    # oracle placement picks, per passage, the best node: no pinned node beats it on KL by much
    oracle = next(x for x in rep["results"] if x["config"] == "g2/bundle" and x["placement"] == "oracle")
    assert oracle["mean"]["ppl_ratio"] <= min(nd["mean"]["ppl_ratio"] for nd in rep["nodes"]) + 1e-6

    from rich.console import Console
    from mlxmoe.quality.report import table

    con = Console(width=240, record=True)
    con.print(table(rep))
    out = con.export_text()
    assert "node 0" in out and "node 1" in out and out.count("pinned") == 2
