"""mlxmoe calibrate --heal: the pure parts (trainable sets, held-out slice,
early stopping), healed parameters apply only on the masked path (a node with
every expert eligible stays the full model exactly), and a small end-to-end heal
that lowers the held-out KL and is what the node then computes."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxmoe.bundle.copy import node_files
from mlxmoe.bundle.manifest import Manifest, heal_file
from mlxmoe.bundle.split import split
from mlxmoe.cli import main
from mlxmoe.errors import MlxMoeError
from mlxmoe.model import heal as mh
from mlxmoe.model.load import load_bundle, load_tokenizer
from mlxmoe.quality import heal as qh
from test_quality import TEXTS


@pytest.fixture(scope="module")
def healed(ckpt, tmp_path_factory):
    """A 2-group bundle healed with router + norms + LoRA (a few steps)."""
    d = tmp_path_factory.mktemp("heal")
    split(str(ckpt("qwen3_moe")), d / "b", 2, bits=None, trunk_bits=None)
    suite = d / "suite.jsonl"  # each passage twice: the held-out slice repeats the training one, so KL must fall
    suite.write_text("".join(json.dumps({"domain": dom, "text": t}) + "\n" for dom, ts in TEXTS.items() for t in ts for _ in "ab"))
    cfg = qh.HealConfig(trainable=qh.TRAINABLE, max_steps=16, check_every=4, heldout_every=2, lr=1e-3, rank=2)
    r = qh.heal_bundle(d / "b", [str(suite)], cfg, out=d / "h")
    return d / "b", d / "h", suite, r


def logits(loaded, ids):
    return np.array(loaded.model(mx.array([ids])))


def test_parse_trainable():
    assert qh.parse_trainable("norms, router") == ("router", "norms")
    for bad in ("", "router,attention", ","):
        with pytest.raises(MlxMoeError, match="--heal-params"):
            qh.parse_trainable(bad)


def test_split_heldout_keeps_one_per_domain():
    items = [(d, [i]) for d in ("a", "b") for i in range(5)]
    train, held = qh.split_heldout(items, 4)
    assert sorted(d for d, _ in held) == ["a", "b"] and len(train) == 8
    with pytest.raises(MlxMoeError, match="2 passages"):
        qh.split_heldout([("a", [1])], 4)


def test_for_group_falls_back_to_every_passage():
    data, placed = ["a", "b", "c", "d"], [0, 1, 0, 0]
    assert qh.for_group(data, placed, 0, 3) == ["a", "c", "d"]
    assert qh.for_group(data, placed, 1, 3) == data  # one passage only: too few to train on


def test_should_stop():
    assert not qh.should_stop([1.0, 0.9], 2)
    assert not qh.should_stop([1.0, 0.9, 0.95, 0.8], 2)
    assert qh.should_stop([1.0, 0.8, 0.85, 0.9], 2)
    assert qh.should_stop([1.0, 1.0, 1.0], 2)


def test_applies_only_when_masked():
    assert not mh.applies({0: [0, 1, 2, 3], 1: [3, 2, 1, 0]}, 4)
    assert mh.applies({0: [0, 1, 2, 3], 1: [0, 1]}, 4)


def test_heal_writes_files_with_provenance(healed):
    _, h, suite, r = healed
    m = Manifest.load(h)
    m.verify_files(h)
    info = m.calibration["heal"]
    assert info["suites"] == [str(suite)] and len(info["suite_sha256"]) == 64
    assert set(info["groups"]) == {"0", "1"} and r["manifest_hash"] == m.hash
    for g, gi in info["groups"].items():
        assert gi["heldout_kl_after"] < gi["heldout_kl_before"]
        assert gi["train_tokens"] > 0 and gi["steps"] > 0 and gi["params"] > 0
        assert m.files[heal_file(int(g))]["role"] == "heal"
    assert m.heal_bytes() == max(m.files[heal_file(g)]["size"] for g in (0, 1))
    assert heal_file(1) in node_files(m, [1]) and heal_file(0) not in node_files(m, [1])


def test_node_computes_the_healed_masked_model(healed):
    b, h, _, _ = healed
    m = Manifest.load(h)
    ids = load_tokenizer(h).encode(TEXTS["prose"][1])
    node, plain = load_bundle(h, 1), load_bundle(h, 1, healed=False)
    assert node.bytes["heal"] == m.files[heal_file(1)]["size"]
    assert np.array_equal(logits(plain, ids), logits(load_bundle(b, 1), ids))  # healed=False: the bundle before
    assert not np.allclose(logits(node, ids), logits(plain, ids), atol=1e-4)
    # the full model masked to the set with the same parameters (training and eval) = the node
    full = load_bundle(h)
    elig = {l: m.eligible(1, l) for l in m.moe_layers}
    full.set_eligible(elig)
    base = dict(tree_flatten(full.model.parameters()))
    with mh.applied(full, base, dict(mx.load(str(h / heal_file(1)))), elig):
        np.testing.assert_allclose(logits(full, ids), logits(node, ids), atol=1e-4)
    np.testing.assert_array_equal(np.array(full.model.parameters()["model"]["norm"]["weight"]),
                                  np.array(base["model.norm.weight"]))  # restored on exit


def test_all_eligible_node_ignores_healed_params(healed, tmp_path):
    _, h, _, _ = healed
    full = load_bundle(h)
    ids = load_tokenizer(h).encode(TEXTS["code"][0])
    healed_params = dict(mx.load(str(h / heal_file(0))))
    # a node whose set is every expert: logits stay identical
    full.group, full.local_ids = 0, {l: list(range(full.manifest.n_experts)) for l in full.manifest.moe_layers}
    before = logits(full, ids)
    assert not mh.apply_to_node(full, healed_params)
    assert np.array_equal(before, logits(full, ids))


def test_calibrate_heal_command(healed, tmp_path):
    b, _, suite, _ = healed
    out = tmp_path / "h2"
    r = CliRunner().invoke(main, ["calibrate", str(b), "--suite", str(suite), "--heal", "--heal-params", "norms",
                                  "--heal-steps", "4", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["heal"]["config"]["trainable"] == ["norms"] and Manifest.load(out).heal_bytes() > 0
    bad = CliRunner().invoke(main, ["calibrate", str(b), "--heal", "--heal-params", "everything"])
    assert bad.exit_code != 0 and "--heal-params" in bad.output


def test_eval_reports_before_and_after(healed):
    from mlxmoe.quality.eval import run_eval

    _, h, suite, _ = healed
    rep = run_eval(h, [str(suite)], placements=("first",))
    rows = {x["config"]: x for x in rep["results"]}
    plain, heal = rows["g2/bundle"], rows["g2/bundle+heal"]
    m = Manifest.load(h)
    assert heal["heal_bytes"] == m.heal_bytes() > 0 and plain["heal_bytes"] == 0
    assert heal["node_bytes"] == plain["node_bytes"] + m.heal_bytes()
    assert heal["mean"]["kl"] != plain["mean"]["kl"] and rep["heal"]["groups"]


def test_plan_reports_heal_bytes(healed):
    from mlxmoe.bundle.plan import plan

    b, h, _, _ = healed
    assert plan(str(h), [64e9])["heal_bytes_per_node"] == Manifest.load(h).heal_bytes() > 0
    assert plan(str(b), [64e9])["heal_bytes_per_node"] == 0
    r = CliRunner().invoke(main, ["plan", str(h), "--nodes", "2x64GB"])
    assert r.exit_code == 0 and "healed parameters" in r.output, r.output
