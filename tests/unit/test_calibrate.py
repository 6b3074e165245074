"""mlxmoe calibrate: statistics are sound, the rewritten bundle is valid, keeps
every expert bit for bit, carries provenance, and bad input gets clear errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmoe.quality import calibrate as cal
from mlxmoe.quality.stats import collect
from mlxmoe.quality import suites
from mlxmoe.cli import main
from mlxmoe.errors import MlxMoeError
from mlxmoe.bundle.manifest import OVERLAY_FILE, Manifest
from mlxmoe.model.load import load_bundle, load_tokenizer
from mlxmoe.bundle.split import split
from test_quality import TEXTS, write_suite


@pytest.fixture(scope="module")
def src(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    source = ckpt("qwen3_moe")
    split(str(source), d / "b", 2, bits=None, trunk_bits=None)
    return source, d / "b", write_suite(d / "suite.jsonl")


def logits(bundle, ids, group=None):
    return np.array(load_bundle(bundle, group).model(mx.array([ids])))


def test_collect_statistics_add_up(src):
    _, b, suite = src
    loaded, tok = load_bundle(b), load_tokenizer(b)
    items = suites.tokenize(tok, suites.load_suite(str(suite))[1])
    st = collect(loaded, items)
    k, n = loaded.manifest.top_k, loaded.manifest.n_experts
    for d, dom in enumerate(st.domains):
        assert st.tokens[dom] == sum(len(i) for x, i in items if x == dom)
        assert np.allclose(st.sel[d].sum(axis=-1), st.tokens[dom] * k)  # k selections per token and layer
        assert np.allclose(st.coact[d].sum(axis=(-1, -2)), st.tokens[dom] * k * (k - 1))
        assert np.allclose(st.mass[d].sum(axis=-1), st.topk_mass[d])
    assert st.out_max.shape == (len(st.layers), n) and (st.out_max >= 0).all()
    assert 0 < st.balanced("topk_mass").min() <= 1.0


def test_calibrate_writes_valid_bundle_with_provenance(src, tmp_path):
    _, b, suite = src
    out = tmp_path / "cal"
    r = cal.calibrate(b, [str(suite)], overlay_per_layer=2, rule="breadth", strategy="coactivation", out=out)
    m = Manifest.load(out)
    m.verify_files(out)
    c = m.calibration
    assert c["suites"] == [str(suite)] and set(c["tokens"]) == set(TEXTS) and all(v > 0 for v in c["tokens"].values())
    assert c["overlay_rule"] == "breadth" and c["overlay_per_layer"] == 2 and c["grouping"] == "coactivation"
    assert c["date"] and "stats" in c and "super_experts" in c and c["overlay_bytes_per_node"] > 0
    assert m.grouping["strategy"] == "coactivation" and OVERLAY_FILE in m.files
    assert all(len(m.overlay_experts(l)) == 2 for l in m.moe_layers)
    assert r["manifest_hash"] == m.hash
    ids = load_tokenizer(out).encode(TEXTS["code"][0])
    # every expert kept bit for bit: the full models agree exactly
    assert np.array_equal(logits(b, ids), logits(out, ids))
    # a node of the new bundle equals the full model masked to its eligible set
    full = load_bundle(out)
    full.set_eligible({l: m.eligible(1, l) for l in m.moe_layers})
    np.testing.assert_allclose(np.array(full.model(mx.array([ids]))), logits(out, ids, 1), atol=1e-4)


def test_calibrate_overlay_bytes_and_in_place(src, tmp_path):
    _, b, suite = src
    import shutil

    work = tmp_path / "b"
    shutil.copytree(b, work)
    per = Manifest.load(work).expert_bytes()
    n_layers = len(Manifest.load(work).moe_layers)
    cal.calibrate(work, [str(suite)], overlay_bytes=int(per * n_layers * 3 + 5), super_check=False)
    m = Manifest.load(work)
    m.verify_files(work)
    assert all(len(m.overlay_experts(l)) == 3 for l in m.moe_layers)
    assert m.calibration["overlay_bytes_per_node"] <= per * n_layers * 3 + 5
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no leftovers


def test_calibrate_from_source_resplits(src, tmp_path):
    source, b, suite = src
    out = tmp_path / "re"
    cal.calibrate(b, [str(suite)], overlay_per_layer=1, strategy="domain", source=str(source), out=out,
                  super_check=False)
    m = Manifest.load(out)
    m.verify_files(out)
    assert m.calibration["grouping"] == "domain" and m.grouping["strategy"] == "domain"
    ids = load_tokenizer(out).encode(TEXTS["prose"][0])
    np.testing.assert_allclose(logits(b, ids), logits(out, ids), atol=1e-5)


def test_calibrate_domain_sets_overlapping_groups(src, tmp_path):
    _, b, suite = src
    out = tmp_path / "sets"
    cal.calibrate(b, [str(suite)], strategy="domain-sets", set_size=5, out=out, super_check=False)
    m = Manifest.load(out)
    m.verify_files(out)
    assert m.overlapping and m.grouping["strategy"] == "domain-sets" and m.calibration["grouping"] == "domain-sets"
    for l in m.moe_layers:
        sets = [m.group_experts(l, g) for g in range(m.n_groups)]
        assert all(len(s) == 5 for s in sets) and set().union(*sets) == set(range(m.n_experts))
    ids = load_tokenizer(out).encode(TEXTS["code"][0])
    assert np.array_equal(logits(b, ids), logits(out, ids))  # the full model, deduplicated, is unchanged
    full = load_bundle(out)
    for g in range(m.n_groups):  # each node = the full model masked to its own (shared) set
        full.set_eligible({l: m.eligible(g, l) for l in m.moe_layers})
        np.testing.assert_allclose(np.array(full.model(mx.array([ids]))), logits(out, ids, g), atol=1e-4)
    with pytest.raises(MlxMoeError, match="cannot hold all 8 experts"):
        cal.calibrate(b, [str(suite)], strategy="domain-sets", set_size=3, out=tmp_path / "x", super_check=False)
    d = m.to_dict()
    d["grouping"].pop("overlap")  # shared experts without the flag: refused, naming the expert
    with pytest.raises(MlxMoeError, match=r"is in group 0 and group 1 \(set \"overlap\": true"):
        Manifest.from_dict(d)


def test_calibrate_cli_json_and_errors(src, tmp_path):
    _, b, suite = src
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["calibrate", str(b), "--suite", str(suite), "--overlay-per-layer", "1",
                                  "--grouping", "mod", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["calibration"]["overlay_per_layer"] == 1 and Manifest.load(out).hash == rep["manifest_hash"]
    for args, msg in [(["--suite", "missing.jsonl"], "missing.jsonl: suite file not found"),
                      (["--overlay-per-layer", "1", "--overlay-bytes", "1MB"], "not both"),
                      (["--overlay-bytes", "lots"], "give a size"),
                      (["--overlay-per-layer", "99"], "between 0 and 8"),
                      (["--grouping", "magic"], "Invalid value")]:
        r = CliRunner().invoke(main, ["calibrate", str(b), "--out", str(tmp_path / "x"), *args])
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
    assert Manifest.load(b).calibration is None  # the source bundle was never touched


def test_super_experts_found_when_one_expert_dominates(src):
    """An expert with a massive output that every token needs: found and put
    first in the overlay."""
    _, b, suite = src
    loaded = load_bundle(b)
    items = suites.tokenize(load_tokenizer(b), suites.load_suite(str(suite))[1])
    st = collect(loaded, items)
    l0, i0 = loaded.manifest.moe_layers[0], 0
    busy = int(np.argmax(st.balanced("sel")[i0]))
    # plant: a huge output for one (not the busiest) expert
    e = (busy + 1) % loaded.manifest.n_experts
    sw = loaded.blocks[l0].switch_mlp
    sw.down_proj.weight[e] = sw.down_proj.weight[e] * 200
    mx.eval(sw.parameters())
    st = collect(loaded, items)
    found = cal.find_super_experts(loaded, st, items)
    assert e in found["experts"].get(l0, []), found
    st.super_experts = found["experts"]
    from mlxmoe.quality import grouping as gr
    assert e in gr.overlay(st, 1)[l0]


# ------------------------------------------------ domain-sets: up-front checks, memory budget

def test_set_size_for_budget_bytes_and_ratio():
    from mlxmoe.quality import grouping as gr

    # 48 experts, 3 groups, 1 byte per expert per layer, 1 layer, trunk 16: a plain node is 16 + 16 = 32
    assert gr.set_size_for_budget(("ratio", 1.5), 48, 3, 1.0, 1, 16) == 32
    assert gr.set_size_for_budget(("bytes", 40), 48, 3, 1.0, 1, 16) == 24
    assert gr.set_size_for_budget(("bytes", 40), 48, 3, 1.0, 1, 16, overlay_bytes=4) == 20  # overlay counts
    assert gr.set_size_for_budget(("ratio", 9.0), 48, 3, 1.0, 1, 16) == 48  # never more than every expert
    assert gr.set_mem_ratio(32, 48, 3, 1.0, 1, 16) == 1.5
    assert gr.budget_text(("bytes", 2e9)) == "2GB" and gr.budget_text(("ratio", 1.5)) == "1.5x"
    with pytest.raises(MlxMoeError, match=r"--set-budget 0.9x: fits 12 experts per layer, fewer than the 16 .* give at least 32B or 1.00x"):
        gr.set_size_for_budget(("ratio", 0.9), 48, 3, 1.0, 1, 16)
    with pytest.raises(MlxMoeError, match="give at least"):
        gr.set_size_for_budget(("bytes", 20), 48, 3, 1.0, 1, 16)


def test_domain_sets_with_too_few_domains_fails_before_statistics(src, tmp_path, monkeypatch):
    _, b, suite = src
    monkeypatch.setattr(cal, "collect", lambda *a, **k: pytest.fail("statistics ran before the check"))
    with pytest.raises(MlxMoeError, match=r"--grouping domain-sets: 3 groups need at least 3 domains in the suite, "
                                          r"it has 2 \(code, prose\)"):
        cal.calibrate(b, [str(suite)], strategy="domain-sets", n_groups=3, out=tmp_path / "x", super_check=False)
    with pytest.raises(MlxMoeError, match="cannot hold all 8 experts"):
        cal.calibrate(b, [str(suite)], strategy="domain-sets", set_size=3, out=tmp_path / "x", super_check=False)
    with pytest.raises(MlxMoeError, match="--set-budget 0.5x: fits"):
        cal.calibrate(b, [str(suite)], strategy="domain-sets", set_budget=("ratio", 0.5), out=tmp_path / "x",
                      super_check=False)
    with pytest.raises(MlxMoeError, match="give them with --grouping domain-sets"):
        cal.calibrate(b, [str(suite)], set_size=5, out=tmp_path / "x", super_check=False)


def test_calibrate_set_budget_reports_set_size_and_memory_ratio(src, tmp_path):
    _, b, suite = src
    m = Manifest.load(b)
    trunk, per_layer = m.files["trunk.safetensors"]["size"], m.expert_bytes() * len(m.moe_layers)
    budget = int(trunk + 6 * per_layer) + 1  # room for 6 of the 8 experts per layer
    r = CliRunner().invoke(main, ["calibrate", str(b), "--suite", str(suite), "--grouping", "domain-sets",
                                  "--set-budget", f"{budget}", "--overlay-per-layer", "0", "--no-super-check",
                                  "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout.strip().splitlines()[-1])["calibration"]
    assert c["set_size"] == 6 and abs(c["mem_ratio"] - (trunk + 6 * per_layer) / (trunk + 4 * per_layer)) < 1e-3
    assert all(len(Manifest.load(tmp_path / "s").group_experts(l, 0)) == 6 for l in m.moe_layers)
    for args, msg in [(["--set-size", "5", "--set-budget", "1.5x"], "not both"),
                      (["--set-budget", "-1x"], "a ratio is a positive number"),
                      (["--set-budget", "lots"], "--set-budget")]:
        r = CliRunner().invoke(main, ["calibrate", str(b), "--grouping", "domain-sets", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
