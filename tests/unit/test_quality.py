"""Quality machinery: metrics on cases with known answers, grouping strategies
give valid balanced partitions, overlays respect their budget, `mlxmoe eval`
reports every metric per domain and refuses bad input clearly."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmoe.quality import grouping as gr
from mlxmoe.quality import eval as q
from mlxmoe.quality import metrics
from mlxmoe.cli import main
from mlxmoe.errors import MlxMoeError
from mlxmoe.bundle.manifest import check_partition
from mlxmoe.bundle.split import split

TEXTS = {
    "code": ["def add(a, b):\n    return a + b\n" * 4, "def sub(a, b):\n    return a - b\n" * 4,
             "for i in range(10):\n    print(i, i * i)\n" * 3],
    "prose": ["the quick brown fox jumps over the lazy dog and runs far away " * 3,
              "mixture of experts models route each token to a few experts only " * 3,
              "le renard brun saute par dessus le chien paresseux encore une fois " * 3],
}


def write_suite(path):
    with open(path, "w") as f:
        for dom, texts in TEXTS.items():
            for t in texts:
                f.write(json.dumps({"domain": dom, "text": t}) + "\n")
    return path


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("qb")
    split(str(ckpt("qwen3_moe")), d / "b", 2, bits=None, trunk_bits=None)
    return d / "b", write_suite(d / "suite.jsonl")


def fake_stats(n=12, layers=(0, 1), domains=("a", "b", "c"), seed=0, k=2):
    """Stats with known structure: experts of domain d are ids where id % 3 == d,
    and experts 0..5 co-activate in pairs (2i, 2i+1)."""
    rng = np.random.default_rng(seed)
    D, L = len(domains), len(layers)
    sel = rng.random((D, L, n)) * 0.1
    for d in range(D):
        sel[d, :, [e for e in range(n) if e % D == d]] += 10.0
    coact = rng.random((D, L, n, n)) * 0.1
    for e in range(0, n, 2):
        coact[:, :, e, e + 1] += 50.0
        coact[:, :, e + 1, e] += 50.0
    return gr.Stats(list(layers), n, k, list(domains), {d: 100 for d in domains}, sel, sel * 0.5, coact,
                    np.full((D, L), 60.0))


# ------------------------------------------------------------------ metrics

def test_metrics_identical_models_are_perfect():
    lp = mx.log(mx.softmax(mx.random.normal((10, 50)), axis=-1))
    tgt = mx.array(np.arange(10) % 50)
    kl, agree, nll = metrics.token_metrics(lp, lp, tgt)
    assert float(mx.abs(kl).max()) < 1e-5
    assert float(agree.mean()) == 1.0
    ref_nll = -mx.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0]
    assert np.allclose(np.array(nll), np.array(ref_nll))


def test_metrics_losing_the_only_used_token_is_a_large_kl():
    ref = mx.log(mx.array([[0.97, 0.01, 0.01, 0.01]] * 4))
    other = mx.log(mx.array([[1e-6, 0.5, 0.3, 0.2 - 1e-6]] * 4))
    kl, agree, nll = metrics.token_metrics(ref, other, mx.array([0, 0, 0, 0]))
    assert float(kl.min()) > 10.0
    assert float(agree.sum()) == 0.0
    assert float(nll.min()) > 13.0


def test_eval_full_eligibility_is_the_reference_and_removing_experts_hurts(bundle):
    from mlxmoe.quality.suites import load_suite
    from mlxmoe.model.load import load_bundle, load_tokenizer

    b, suite = bundle
    loaded, tok = load_bundle(b), load_tokenizer(b)
    m = loaded.manifest
    items = q.make_items(tok, load_suite(str(suite))[1], prompt_tokens=8)
    everything = {l: list(range(m.n_experts)) for l in m.moe_layers}
    only_two = {l: [0, 1] for l in m.moe_layers}  # top_k=2: exactly two eligible experts
    cfgs = [q.Config("all", 1, "all", None, 0, [everything]), q.Config("two", 1, "two", None, 0, [only_two])]
    q.size_configs(m, cfgs)
    rep = q.evaluate(loaded, items, cfgs, ("first", "oracle"))
    full = [r for r in rep["results"] if r["config"] == "all"]
    for r in full:
        for d in r["domains"].values():
            assert d["kl"] < 1e-6 and d["agreement"] == 1.0
            assert abs(d["ppl_ratio"] - 1.0) < 1e-5 and abs(d["capture"] - 1.0) < 1e-6 and d["regret"] == 0
    two = [r for r in rep["results"] if r["config"] == "two"][0]
    assert two["mean"]["kl"] > 0.01 and two["mean"]["capture"] < 0.9
    assert cfgs[0].node_bytes > cfgs[1].node_bytes
    assert abs(cfgs[0].mem_ratio - 1.0) < 1e-9  # one group holding everything = the plain 1/1 split


# ------------------------------------------------------------------ grouping

@pytest.mark.parametrize("strategy", gr.STRATEGIES)
@pytest.mark.parametrize("n_groups", [2, 3, 4, 5])
def test_strategies_give_valid_balanced_partitions(strategy, n_groups):
    st = fake_stats()
    for exclude in ((), (0, 7)):
        groups = gr.partition(strategy, 12, n_groups, st, 0, exclude=exclude)
        assert sorted(e for g in groups for e in g) == [e for e in range(12) if e not in exclude]
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
    ov = {0: [3], 1: [4, 5]}
    g = gr.grouping(strategy, n_groups, [0, 1], 12, st, ov)
    for l, groups in g["layers"].items():
        check_partition(groups, 12, f"layer {l}")
        sizes = [len(set(x) - set(ov[int(l)])) for x in groups]
        assert max(sizes) - min(sizes) <= 1  # balanced without the overlay
        elig = [len(set(x) | set(ov[int(l)])) for x in groups]
        assert max(elig) - min(elig) <= 1


def test_coactivation_and_domain_find_planted_structure():
    st = fake_stats()
    pairs = gr.partition("coactivation", 12, 6, st, 0)
    assert sorted(sorted(g) for g in pairs) == [[e, e + 1] for e in range(0, 12, 2)]
    dom = gr.partition("domain", 12, 3, st, 0)
    assert sorted(sorted(g) for g in dom) == [[e for e in range(12) if e % 3 == d] for d in range(3)]
    assert gr.partition("mod", 12, 3, st, 0) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_overlay_respects_budget_and_puts_super_experts_first():
    st = fake_stats()
    for n in (0, 1, 2, 4, 8):
        for rule in gr.OVERLAY_RULES:
            ov = gr.overlay(st, n, rule)
            assert all(len(v) == n and len(set(v)) == n for v in ov.values())
    st.super_experts = {1: [11]}
    ov = gr.overlay(st, 1, "mass")
    assert ov[1] == [11]
    assert gr.overlay_for_bytes(10_000, 100, 2) == 50
    assert gr.overlay_for_bytes(99, 100, 2) == 0
    with pytest.raises(MlxMoeError, match="between 0 and 12"):
        gr.overlay(st, 13)
    with pytest.raises(MlxMoeError, match="unknown grouping strategy"):
        gr.partition("nope", 12, 2)
    with pytest.raises(MlxMoeError, match="needs calibration statistics"):
        gr.partition("coactivation", 12, 2)


def test_breadth_prefers_experts_every_domain_uses():
    st = fake_stats()
    st.sel[:, :, 5] += 5.0  # used by every domain, less than each domain's favourites
    assert gr.overlay(st, 1, "breadth")[0] == [5]
    assert gr.overlay(st, 1, "mass")[0] != [5]


def test_domain_sets_cover_every_expert():
    st = fake_stats()
    sets = gr.domain_sets(st, [["a"], ["b", "c"]], 7)
    for l in st.layers:
        assert all(len(s[l]) == 7 for s in sets)
        assert set().union(*[set(s[l]) for s in sets]) == set(range(12))


# ------------------------------------------------------------------ command

def test_eval_cli_json_has_every_metric_per_domain(bundle, tmp_path):
    b, suite = bundle
    r = CliRunner().invoke(main, ["eval", str(b), "--suite", str(suite), "--calib-suite", str(suite),
                                  "--groups", "2", "--strategies", "bundle,contiguous,coactivation",
                                  "--overlay", "0,1", "--prompt-tokens", "8", "--race-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert set(rep["tokens"]) == set(TEXTS)
    names = {x["config"] for x in rep["results"]}
    assert {"g2/bundle", "g2/contiguous/none", "g2/contiguous/mass1", "g2/coactivation/mass1"} <= names
    assert {x["placement"] for x in rep["results"]} == set(q.PLACEMENTS)
    for x in rep["results"]:
        assert set(x["domains"]) == set(TEXTS)
        for d in x["domains"].values():
            assert set(metrics.METRICS) <= set(d)
            assert 0 <= d["agreement"] <= 1 and d["kl"] >= -1e-6 and d["ppl_ratio"] > 0
        assert x["node_bytes"] > 0 and x["mem_ratio"] >= 1.0 - 1e-9
        for k in metrics.METRICS:
            assert k in x["mean"] and k in x["worst"]
    oracle = [x for x in rep["results"] if x["placement"] == "oracle"]
    assert all(x["mean"]["regret"] == 0 for x in oracle)


def test_eval_table_and_plot(bundle, tmp_path):
    pytest.importorskip("matplotlib")
    b, suite = bundle
    out = tmp_path / "q.png"
    r = CliRunner().invoke(main, ["eval", str(b), "--suite", str(suite), "--prompt-tokens", "8",
                                  "--placement", "first", "--plot", str(out), "--progress", "quiet"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "g2/bundle" in r.output and out.stat().st_size > 1000


@pytest.mark.parametrize("args,msg", [
    (["--suite", "nope.jsonl"], "nope.jsonl: suite file not found"),
    (["--groups", "x"], "comma-separated integers"),
    (["--groups", "0"], "integers >= 1"),
    (["--groups", "99", "--strategies", "contiguous"], "--groups 99: must be between 1"),
    (["--groups", "7", "--strategies", "contiguous"], "fewer than top_k=2"),
    (["--strategies", "magic"], "unknown strategy"),
    (["--placement", "psychic"], "unknown placement"),
    (["--groups", "3", "--strategies", "bundle"], "include 2 in --groups"),
])
def test_eval_bad_input_clear_errors(bundle, args, msg):
    b, _ = bundle
    r = CliRunner().invoke(main, ["eval", str(b), *args])
    assert r.exit_code != 0
    assert msg in r.output, r.output


def test_suite_errors_name_the_file_and_line(tmp_path):
    from mlxmoe.quality.suites import load_suite

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "x", "text": "ok"}\n{"domain": "x"}\n')
    with pytest.raises(MlxMoeError, match="bad.jsonl:2: .*'text'"):
        load_suite(str(bad))
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(MlxMoeError, match="must be .jsonl or .txt"):
        load_suite(str(tmp_path / "bad.csv"))
    txt = tmp_path / "notes.txt"
    txt.write_text("first passage\n\nsecond passage\n")
    name, ps = load_suite(str(txt))
    assert [(p.domain, p.text) for p in ps] == [("notes", "first passage"), ("notes", "second passage")]


# ------------------------------------------------ short passages, intervals, progress

def test_prompt_split_keeps_short_passages_with_a_shorter_prompt():
    assert q.prompt_split(40, 32) == 32  # leaves 8 to score: as before
    assert q.prompt_split(39, 32) == 19  # a fortune of 39 tokens: half is prompt
    assert q.prompt_split(10, 8) == 5 and q.prompt_split(4, 32) == 2
    assert q.prompt_split(3, 32) is None


def test_select_items_accounts_for_every_passage():
    from mlxmoe.quality.suites import Passage

    class Tok:
        def encode(self, text):
            return list(range(len(text.split())))

    ps = [Passage("a", "w " * 50), Passage("a", "w " * 20), Passage("a", "w " * 30), Passage("b", "w w w"),
          Passage("b", "w")]
    items, use = q.select_items(Tok(), ps, per_domain=2, prompt_tokens=32)
    assert [(it.domain, len(it.ids), it.prompt) for it in items] == [("a", 50, 32), ("a", 20, 10)]
    assert use == {"given": 5, "used": 2, "short_prompt": 1,
                   "skipped": {"fewer than 2 tokens": 1, "fewer than 4 tokens": 1, "over --passages per domain": 1}}
    with pytest.raises(MlxMoeError, match="no passage has 4 tokens"):
        q.select_items(Tok(), ps[3:], prompt_tokens=32)


def test_eval_json_short_passages_per_passage_rows_intervals_and_progress(bundle):
    b, suite = bundle
    r = CliRunner().invoke(main, ["eval", str(b), "--suite", str(suite), "--prompt-tokens", "64",
                                  "--placement", "first,oracle", "--onehop", "--json", "--progress", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)  # stdout: the report only
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert events and all(e["event"] == "progress" for e in events) and events[-1]["finished"]
    use = rep["passage_use"]
    assert use["given"] == 6 and use["used"] + sum(use["skipped"].values()) == 6 and use["short_prompt"] > 0
    assert rep["passages"] == use["used"] and rep["blas"]["status"] in ("ok", "warn")
    for x in rep["results"]:
        assert len(x["per_passage"]) == use["used"]
        for row in x["per_passage"]:
            assert {"domain", "tokens", "kl", "agreement", "logp_ref", "logp"} <= set(row) and row["tokens"] >= 2
        for k in ("kl", "agreement", "ppl_ratio", "capture", "regret"):
            lo, hi = x["intervals"][k]
            assert lo - 1e-9 <= x["mean"][k] <= hi + 1e-9, (k, x["mean"][k], lo, hi)
    oh = rep["onehop"]
    assert set(oh["intervals"]) == {"kl", "agreement", "ppl_ratio", "remote_share"} and len(oh["per_passage"]) == use["used"]


def test_eval_table_shows_intervals_and_passage_use(bundle):
    b, suite = bundle
    r = CliRunner().invoke(main, ["eval", str(b), "--suite", str(suite), "--prompt-tokens", "64",
                                  "--placement", "first", "--progress", "quiet"], terminal_width=240)
    assert r.exit_code == 0, r.output
    assert "passages: 6 of 6 used" in r.stdout and "shorter prompt" in r.stdout
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", r.stdout), r.stdout


def test_builtin_suite_warns_once_for_another_model(bundle):
    from mlxmoe.quality.suites import REFERENCE, builtin_warning, is_reference_model

    b, _ = bundle
    r = CliRunner().invoke(main, ["eval", str(b), "--placement", "first", "--progress", "quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: no --suite given") == 1 and "builtin" in r.stderr
    json.loads(r.stdout)
    ref = json.loads((REFERENCE / "config.json").read_text())
    assert is_reference_model({"id": "x/reference-moe"}) and is_reference_model({"id": "local", "config": ref})
    assert builtin_warning({"id": "Qwen/Qwen3-30B-A3B", "config": {}}, "--suite").startswith("warning: no --suite")
