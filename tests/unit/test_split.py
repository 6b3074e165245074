"""mlxmoe split: every source tensor lands in exactly one bundle (or the
overlay as a copy), bundles reassemble to the source, bad input is refused."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from mlxmoe.bundle.arch import get_arch
from mlxmoe.bundle.checkpoint import SafetensorsFile, open_source
from mlxmoe.cli import main
from mlxmoe.errors import CheckpointError, ManifestError, MlxMoeError
from mlxmoe.bundle.manifest import OVERLAY_FILE, TRUNK_FILE, Manifest, group_file
from mlxmoe.model.load import load_bundle
from mlxmoe.bundle.split import split


def read_all(path):
    f = SafetensorsFile(path)
    return {k: np.array(f.read(k).astype(mx.float32)) if f.tensors[k].dtype in ("BF16",) else np.array(f.read(k)) for k in f.keys()}


def source_experts(src_dir, arch_name):
    """HF source -> {(layer, expert, mlx_proj, kind): array in MLX orientation}."""
    arch = get_arch(arch_name)
    src = open_source(str(src_dir))
    out, rx = {}, arch.expert_re()
    for name in src.files:
        m = rx.match(name)
        if not m:
            continue
        a = np.array(src.files[name].read(name))
        if arch.packed:
            layer, proj, kind = m.groups()
            for e in range(a.shape[0]):
                t = a[e].T if a.ndim == 3 else a[e]
                if proj == "gate_up_proj":
                    k = "bias" if kind else "weight"
                    out[(int(layer), e, "gate_proj", k)] = t[::2] if kind else t[::2]
                    out[(int(layer), e, "up_proj", k)] = t[1::2]
                else:
                    out[(int(layer), e, "down_proj", "bias" if kind else "weight")] = t
        else:
            layer, e, proj, kind = m.groups()
            out[(int(layer), int(e), arch.proj[proj], kind)] = a
    return out, src


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_unquantized_split_reassembles_bit_for_bit(ckpt, tmp_path, arch):
    src_dir = ckpt(arch)
    overlay = {"all": [1, 6]}
    m = split(str(src_dir), tmp_path / "b", 2, overlay=overlay, bits=None, trunk_bits=None)
    b = tmp_path / "b"
    want, src = source_experts(src_dir, arch)
    a = get_arch(arch)
    seen = {}
    for g in range(2):
        t = read_all(b / group_file(g))
        for l in m.moe_layers:
            for i, e in enumerate(m.group_experts(l, g)):
                for (wl, we, p, k), v in want.items():
                    if (wl, we) == (l, e):
                        got = t[a.mlx_name(l, p, k)][i]
                        np.testing.assert_array_equal(got, v)
                        assert (l, e, p, k) not in seen, "expert stored in two groups"
                        seen[(l, e, p, k)] = g
    assert set(seen) == set(want), "every expert tensor lands in exactly one group"
    ov = read_all(b / OVERLAY_FILE)
    for l in m.moe_layers:
        for i, e in enumerate(m.overlay_experts(l)):
            np.testing.assert_array_equal(ov[a.mlx_name(l, "gate_proj", "weight")][i], want[(l, e, "gate_proj", "weight")])
    # every non-expert source tensor is in the trunk, unchanged up to mlx-lm's own
    # renaming (sanitize: e.g. DeepSeek's kv_b_proj -> embed_q / unembed_out)
    from mlxmoe.bundle.arch import normalize_config
    from mlxmoe.bundle.split import _model_skeleton

    skel = _model_skeleton(normalize_config(src.config))
    trunk = read_all(b / TRUNK_FILE)
    expected = {}
    rx = a.expert_re()
    for name in src.files:
        if not rx.match(name):
            expected.update(skel.sanitize({name: src.files[name].read(name)}))
    assert set(trunk) == set(expected)
    for name, v in expected.items():
        np.testing.assert_array_equal(trunk[name], np.array(v), err_msg=name)
    # manifest validates and its hashes match
    m2 = Manifest.load(b)
    assert m2.hash == m.hash
    m2.verify_files(b)


def test_quantized_split_within_quantization_error(ckpt, tmp_path):
    src_dir = ckpt("qwen3_moe")
    m = split(str(src_dir), tmp_path / "q", 3, bits=4, group_size=32, trunk_bits=8)
    want, _ = source_experts(src_dir, "qwen3_moe")
    t = SafetensorsFile(tmp_path / "q" / group_file(1))
    l, e = m.moe_layers[0], m.group_experts(m.moe_layers[0], 1)[0]
    name = "model.layers.%d.mlp.switch_mlp.gate_proj." % l
    w = mx.dequantize(t.read(name + "weight")[0], t.read(name + "scales")[0], t.read(name + "biases")[0], group_size=32, bits=4)
    ref = want[(l, e, "gate_proj", "weight")]
    err = np.abs(np.array(w) - ref).max()
    assert 0 < err < np.abs(ref).max() / 7  # 4-bit: within one quantization step
    trunk = SafetensorsFile(tmp_path / "q" / TRUNK_FILE)
    assert "model.layers.0.self_attn.q_proj.scales" in trunk.tensors  # trunk quantized at 8 bits
    assert trunk.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "U32"
    assert "model.layers.0.mlp.gate.weight" in trunk.tensors and "model.layers.0.mlp.gate.scales" not in trunk.tensors
    assert m.quantization == {"trunk": {"bits": 8, "group_size": 32}, "experts": {"bits": 4, "group_size": 32}, "kv_bits": 8}


def test_sharded_source_and_mlx_community_source(ckpt, tmp_path):
    sharded = ckpt("qwen3_moe", shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    m = split(str(sharded), tmp_path / "s", 2, bits=None, trunk_bits=None)
    assert m.files[TRUNK_FILE]["size"] > 0
    # an mlx-community style directory: mlx-lm's own quantized conversion
    from mlx_lm.utils import load_model, save_model, save_config
    from mlxmoe.bundle.arch import normalize_config
    import mlx.nn as nn

    cfg = normalize_config(tiny.config(sharded))
    model, _ = load_model(sharded, model_config=cfg)
    nn.quantize(model, group_size=32, bits=4)
    mlxdir = tmp_path / "mlx"
    save_model(mlxdir, model)
    save_config({**cfg, "quantization": {"group_size": 32, "bits": 4}}, mlxdir / "config.json")
    for f in sharded.glob("tokenizer*"):
        shutil.copy(f, mlxdir)
    m2 = split(str(mlxdir), tmp_path / "fromq", 2)
    assert m2.quantization["experts"] == {"group_size": 32, "bits": 4}
    t = SafetensorsFile(tmp_path / "fromq" / group_file(1))
    src = SafetensorsFile(next(mlxdir.glob("model*.safetensors")))
    n = "model.layers.1.mlp.switch_mlp.up_proj.scales"
    np.testing.assert_array_equal(np.array(t.read(n)), np.array(src.read(n))[4:8])


def test_hf_repo_id_through_cache(ckpt, tmp_path, monkeypatch):
    src = ckpt("mixtral")
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "abc123"
    shutil.copytree(src, snap)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    m = split("acme/tiny-moe", tmp_path / "out", 2, bits=None, trunk_bits=None)
    assert m.model["id"] == "acme/tiny-moe" and m.model["revision"] == "abc123"
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*does not download"):
        split("acme/absent", tmp_path / "out2", 2)


def _no_partial(tmp_path):
    return not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_bad_inputs_are_refused_with_clear_errors(ckpt, tmp_path):
    src = ckpt("qwen3_moe")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor .* ends at byte"):
        split(str(bad), tmp_path / "o1", 2)
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[24:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        split(str(bad), tmp_path / "o1", 2)
    st.unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors'.*does not exist"):
        split(str(bad), tmp_path / "o1", 2)
    with pytest.raises(ManifestError, match="between 1 and the number of experts"):
        split(str(src), tmp_path / "o2", 9)
    with pytest.raises(ManifestError, match="fewer than the model's top_k=2"):
        split(str(src), tmp_path / "o2", 8)
    with pytest.raises(ManifestError, match=r"expert\(s\) \[8\] do not exist"):
        split(str(src), tmp_path / "o2", 2, overlay={"all": [8]})
    with pytest.raises(ManifestError, match="expert 3 is in group 0 and group 1"):
        split(str(src), tmp_path / "o2", 2, grouping={"groups": [[0, 1, 2, 3], [3, 4, 5, 6, 7]]})
    with pytest.raises(ManifestError, match="experts \\[7\\] are in no group"):
        split(str(src), tmp_path / "o2", 2, grouping={"groups": [[0, 1, 2, 3], [3, 4, 5, 6]], "overlap": True})
    with pytest.raises(ManifestError, match="field 'overlap' must be true or false"):
        split(str(src), tmp_path / "o2", 2, grouping={"groups": [[0, 1, 2, 3], [4, 5, 6, 7]], "overlap": "yes"})
    unk = tmp_path / "unk"
    shutil.copytree(src, unk)
    c = json.loads((unk / "config.json").read_text())
    c["model_type"] = "llama4"
    (unk / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="'llama4' is not supported; supported: deepseek_v3, gpt_oss, kimi_k2, mixtral, olmoe, qwen2_moe, qwen3_moe"):
        split(str(unk), tmp_path / "o3", 2)
    assert _no_partial(tmp_path)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_overlapping_groups_split_and_load(ckpt, tmp_path):
    """Groups that share experts: each group file holds its whole set, the
    full model holds each expert once, a node equals the masked full model."""
    src = ckpt("qwen3_moe")
    out = tmp_path / "o"
    m = split(str(src), out, 2, grouping={"groups": [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], "overlap": True},
              bits=None, trunk_bits=None)
    assert m.overlapping and Manifest.load(out).eligible(1, m.moe_layers[0]) == [3, 4, 5, 6, 7]
    full = load_bundle(out)
    assert all(full.eligible(l) == list(range(8)) for l in m.moe_layers)
    ids = mx.array([[1, 5, 9, 2, 7]])
    split(str(src), tmp_path / "plain", 2, bits=None, trunk_bits=None)
    np.testing.assert_array_equal(np.array(full.model(ids)), np.array(load_bundle(tmp_path / "plain").model(ids)))
    full.set_eligible({l: m.eligible(1, l) for l in m.moe_layers})
    np.testing.assert_allclose(np.array(load_bundle(out, 1).model(ids)), np.array(full.model(ids)), atol=1e-4)


def test_failure_midway_leaves_no_output(ckpt, tmp_path, monkeypatch):
    import mlxmoe.bundle.split as sp

    def boom(*a, **k):
        raise MlxMoeError("disk full (simulated)")

    monkeypatch.setattr(sp, "write_experts", boom)
    with pytest.raises(MlxMoeError, match="simulated"):
        split(str(ckpt("olmoe")), tmp_path / "o", 2)
    assert list(tmp_path.iterdir()) == []


def test_cli_split_help_and_run(ckpt, tmp_path):
    r = CliRunner().invoke(main, ["split", "--help"])
    assert r.exit_code == 0 and "--groups" in r.output and "trunk.safetensors" in r.output
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"layers": {"0": [2], "1": [5]}}))
    r = CliRunner().invoke(main, ["split", str(ckpt("qwen2_moe")), str(tmp_path / "b"), "--groups", "2", "--overlay", str(ov),
                                  "--group-size", "32", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert set(out["files"]) == {TRUNK_FILE, group_file(0), group_file(1), OVERLAY_FILE}
    r = CliRunner().invoke(main, ["split", str(ckpt("qwen2_moe")), str(tmp_path / "b"), "--groups", "2"])
    assert r.exit_code != 0 and "already exists" in r.output


def test_copy_for_one_node_is_verified_and_loads(ckpt, tmp_path):
    from mlxmoe.model.load import load_bundle
    from mlxmoe.errors import BundleError

    split(str(ckpt("qwen3_moe")), tmp_path / "b", 2, overlay={"all": [5]}, bits=None, trunk_bits=None)
    r = CliRunner().invoke(main, ["copy", str(tmp_path / "b"), str(tmp_path / "n1"), "--group", "1", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    files = set(json.loads(r.output.strip().splitlines()[-1])["files"])
    assert {TRUNK_FILE, group_file(1), OVERLAY_FILE, "distribution.json", "tokenizer.json"} <= files
    assert group_file(0) not in files and not (tmp_path / "n1" / group_file(0)).exists()
    load_bundle(tmp_path / "n1", 1)
    with pytest.raises(BundleError, match="experts-group-00.safetensors: missing"):
        load_bundle(tmp_path / "n1", 0)
    r = CliRunner().invoke(main, ["copy", str(tmp_path / "b"), str(tmp_path / "n2"), "--group", "7"])
    assert r.exit_code != 0 and "this bundle has groups 0..1" in r.output
