"""The single-token MoE paths (mlxmoe/model/fused.py, mlxmoe/kernels/moe_step.py).

CPU: the pure-MLX reference equals an independent float64 computation and
mlx-lm's own MoE block across bits 4/8, group sizes 32/64/128, top-k 2-8; a
node picks and reports its path; greedy tokens over 256 steps on the committed
reference model are identical on the fused path and on mlx-lm's block code.
Metal sources cannot run here: their assembly and launch geometry are checked.
GPU (-m gpu, on the GPU machine): the kernels equal the reference."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxmoe.kernels import moe_step
from kernel_cases import GRID, front_case, ground_truth, inputs, make_experts, tail_case
from mlxmoe.kernels.moe_step import FusedMoE, QuantizedExperts, dense, geometry, reference, template, unsupported

REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"
@pytest.mark.parametrize("bits,gs,k", GRID)
def test_reference_equals_float64_ground_truth(bits, gs, k):
    ex = make_experts(16, 256, 128, bits, gs)
    x, logits = inputs(16, 256)
    for norm in (True, False):
        got = np.array(reference(x, logits, ex, k, norm))
        want = ground_truth(x, logits, ex, k, norm)
        assert np.abs(got - want).max() <= 1e-4 * (np.abs(want).max() + 1)


@pytest.mark.parametrize("bits,gs,k", [(4, 64, 8), (8, 32, 2), (4, 128, 6), (8, 128, 4)])
def test_dense_judge_equals_float64_ground_truth(bits, gs, k):
    ex = make_experts(16, 256, 128, bits, gs)
    x, logits = inputs(16, 256)
    want = ground_truth(x, logits, ex, k, True)
    assert np.abs(np.array(dense(x, logits, ex, k, True)) - want).max() <= 1e-4 * (np.abs(want).max() + 1)


@pytest.mark.parametrize("bits,gs,k", [(4, 64, 8), (8, 32, 2), (4, 128, 6), (8, 128, 4)])
def test_reference_equals_mlx_lm_block(bits, gs, k):
    """The fused step of a real mlx-lm Qwen3 MoE block = the block's own code (float32)."""
    import mlx.nn as nn
    from mlx_lm.models.qwen3_moe import ModelArgs, Qwen3MoeSparseMoeBlock

    args = ModelArgs(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=1, intermediate_size=512,
                     num_attention_heads=4, num_experts=16, num_experts_per_tok=k, decoder_sparse_step=1,
                     mlp_only_layers=[], moe_intermediate_size=128, rms_norm_eps=1e-6, vocab_size=64,
                     num_key_value_heads=2, head_dim=64, rope_theta=1e6, tie_word_embeddings=False,
                     max_position_embeddings=128, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(args)
    nn.quantize(block, group_size=gs, bits=bits, class_predicate=lambda p, m: p.startswith("switch_mlp") and hasattr(m, "to_quantized"))
    sw = block.switch_mlp
    ex = QuantizedExperts(*[(p.weight, p.scales, p.biases) for p in (sw.gate_proj, sw.up_proj, sw.down_proj)],
                          group_size=gs, bits=bits)
    x = mx.random.normal((1, 1, 256), key=mx.random.key(5))
    got = reference(x.reshape(-1), block.gate(x), ex, k, True)
    assert mx.abs(got - block(x).reshape(-1)).max().item() <= 1e-4


def test_masked_experts_are_never_chosen():
    ex = make_experts(16, 256, 128, 4, 64)
    x, logits = inputs(16, 256, seed=3)
    mask = mx.array([0.0 if e % 4 == 0 else -mx.inf for e in range(16)])
    idx, w = moe_step.route(logits + mask, 3, True)
    assert all(int(e) % 4 == 0 for e in idx.tolist()) and abs(w.sum().item() - 1) < 1e-6
    got = np.array(reference(x, logits + mask, ex, 3, True))
    assert np.abs(got - ground_truth(x, logits + mask, ex, 3, True)).max() < 1e-3


def test_unsupported_shapes_are_named():
    assert unsupported(make_experts(8, 256, 128, 4, 64), 4) is None
    assert "bits" in unsupported(make_experts(8, 256, 128, 2, 64), 4)
    assert "top-k" in unsupported(make_experts(8, 256, 128, 4, 64), 9)


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_kernel_sources_and_launch_geometry(backend):
    """What can be checked without the GPU: sources assembled, every input and
    template constant used, one warp per output row, whole threadgroups."""
    src = FusedMoE(backend).sources()
    assert "qdot_lane" in src["header"] and "s_sel[rank]" in src["gate_up"] and "s_w[lane]" in src["down"]
    for body, names, out in ((src["gate_up"], moe_step.GATE_UP_INPUTS, "hid"), (src["down"], moe_step.DOWN_INPUTS, "y")):
        for n in names + [out, "H", "I", "E", "K", "BITS", "GS"] + (["NORM"] if out == "y" else []):
            assert f"{n}" in body or n in src["header"], (backend, n)
        assert body.count("{") == body.count("}")
    assert src["header"].count("{") == src["header"].count("}")
    ex = make_experts(128, 2048, 768, 4, 64)
    geo = geometry(ex, 8)
    assert geo["gate_up"]["output_shape"] == (8, 768) and geo["down"]["output_shape"] == (2048,)
    for g in geo.values():
        rows = int(np.prod(g["output_shape"]))
        assert g["grid"][0] % g["threadgroup"][0] == 0 and rows * 32 <= g["grid"][0] < rows * 32 + g["threadgroup"][0]
    names = [n for n, _ in template(ex, 8, True, mx.bfloat16)]
    assert names == ["T", "H", "I", "E", "K", "BITS", "GS", "NORM"]


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_layer_tail_sources(backend):
    from mlxmoe.kernels import layer_tail
    src = layer_tail.FusedTail(backend).sources()
    for name, ins in layer_tail.FusedTail.INPUTS.items():
        body = src[name]
        for n in ins + layer_tail.FusedTail.OUTPUTS[name]:
            assert n in body, (backend, name, n)
        assert body.count("{") == body.count("}")
    from mlxmoe.kernels import attn_front
    src = attn_front.FusedFront(backend).sources()
    for name, ins in attn_front.FusedFront.INPUTS.items():
        for n in ins + attn_front.FusedFront.OUTPUTS[name]:
            assert n in src[name], (backend, name, n)
        assert src[name].count("{") == src[name].count("}") and "xn[i]" not in src[name]
    moe = FusedMoE(backend).sources()
    assert "res[warp]" in moe["down_res"] and "res[" not in moe["down"] and "STORE" not in moe["down"] + moe["down_res"]
    assert layer_tail.grid(2048) == (2048 * 32, 1, 1) and layer_tail.grid(43)[0] % 256 == 0


def test_kernel_sets_launch_glue_with_a_fake_backend(monkeypatch):
    """The Python side of every kernel call (specialisation, input lists,
    output shapes), with MLX's kernel factory replaced by a fake that checks
    the call and returns zeros: what CPU-only CI can check of the GPU path."""
    from mlxmoe.kernels.attn_front import FusedFront
    from mlxmoe.kernels.layer_tail import FusedTail

    made = []

    def fake_kernel(name, input_names, output_names, source, header=""):
        made.append((name, source))
        assert source.startswith("  using T = ") and "constexpr int" in source and "template" not in source.split("\n")[0]

        def call(inputs, output_shapes, output_dtypes, grid, threadgroup, **kw):
            assert "template" not in kw and len(inputs) == len(input_names) and len(output_shapes) == len(output_names)
            assert grid[0] % threadgroup[0] == 0
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_kernel)
    ex = make_experts(16, 256, 128, 4, 64, mx.bfloat16)
    x, logits = (t.astype(mx.bfloat16) for t in inputs(16, 256))
    assert FusedMoE("cuda")(x, logits, ex, 4, True, res=x).shape == x.shape
    a, res, t = tail_case(8, 64, "quantized", mx.bfloat16, e=16)
    assert [o.shape for o in FusedTail("cuda")(a, res, t)] == [(256,), (256,), (16,)]
    xf, f = front_case(8, 64, 64, mx.bfloat16)
    assert [o.shape for o in FusedFront("cuda")(xf, f, 5)] == [(1, 4, 1, 64), (1, 2, 1, 64), (1, 2, 1, 64)]
    names = [n.rsplit("_", 1)[0] for n, _ in made]  # one kernel per specialisation
    assert names == ["mlxmoe_gate_up", "mlxmoe_down", "mlxmoe_down_res", "mlxmoe_attn_out", "mlxmoe_router_q",
                     "mlxmoe_qkv", "mlxmoe_heads"]


# ---- the node --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref_bundle(tmp_path_factory):
    from mlxmoe.bundle.split import split

    out = tmp_path_factory.mktemp("fused") / "b"
    split(str(REFERENCE), out, 3, bits=4, group_size=64, kv_bits=8)
    return out


def test_node_picks_a_path_and_reports_it(ref_bundle, monkeypatch):
    from mlxmoe.model import fused
    from mlxmoe.node.engine import Node

    node = Node.load(str(ref_bundle), 0, verify=False)
    assert node.info()["moe_path"] == fused.default_path() == "reference"
    assert fused.install(node.loaded, "mlx-lm") == "mlx-lm" and node.info()["moe_path"] == "mlx-lm"
    monkeypatch.setenv(fused.ENV, "fused-cuda")  # no CUDA here: falls back, says why
    assert fused.install(node.loaded) == "reference" and node.loaded.moe_path_reason


def test_greedy_256_tokens_identical_fused_and_unfused(ref_bundle):
    """Float32 model, so that both paths compute at the same precision (MLX's
    bfloat16 CPU matmuls are the less precise side; see README)."""
    from mlxmoe.model import fused
    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node

    node = Node.load(str(ref_bundle), None, verify=False, kv_bits=None)
    node.model.set_dtype(mx.float32)
    prompt = node.encode("def add(a, b):\n    return")
    out = {}
    for path in ("reference", "mlx-lm"):
        fused.install(node.loaded, path)
        out[path] = [e.token for e in node.generate(None, prompt, GenParams(max_tokens=256, temperature=0.0))]
    assert len(out["reference"]) == 256 and out["reference"] == out["mlx-lm"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_layer_tail_takes_every_moe_layer_and_keeps_the_tokens(ckpt, tmp_path, arch):
    """The layer path (attention without o_proj, then o_proj + residual, norm +
    router, MoE + residual; shared experts on qwen2_moe) on the reference ops:
    same greedy tokens as mlx-lm's layers, on a node with every expert and a
    one-group node (local router rows)."""
    from mlxmoe.model import fused, moe
    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node
    from mlxmoe.bundle.split import split

    split(str(ckpt(arch)), tmp_path / "b", 2, bits=4, group_size=32, kv_bits=None)
    for group, kv_bits in ((None, None), (0, None), (0, 8)):  # 8: the quantized KV cache's update and attention
        node = Node.load(str(tmp_path / "b"), group, verify=False, kv_bits=kv_bits)
        node.model.set_dtype(mx.float32)
        out = {}
        for path in ("reference", "mlx-lm"):
            fused.install(node.loaded, path)
            out[path] = [e.token for e in node.generate(None, [1, 2, 3, 4], GenParams(max_tokens=24, temperature=0.0))]
            assert node.info()["fused_layers"] == (3 if path == "reference" else 0)
            if path == "reference":  # the attention front: Qwen3's layout only
                fronts = [moe.state_of(node.model.layers[l]).layer_args[1] is not None for l in node.loaded.manifest.moe_layers]
                assert fronts == [arch == "qwen3_moe"] * 3
        assert out["reference"] == out["mlx-lm"], (arch, group, kv_bits)


def test_layer_tail_reference_equals_mlx_lm_ops():
    """layer_tail.reference = o_proj, residual add, RMSNorm and router as mlx-lm's modules run them."""
    import mlx.nn as nn

    from mlxmoe.kernels.layer_tail import QLinear, Tail, reference as tail_reference

    o, norm = nn.QuantizedLinear(128, 64, bias=False, group_size=32, bits=8), nn.RMSNorm(64, eps=1e-5)
    norm.weight = 1 + 0.1 * mx.random.normal((64,), key=mx.random.key(2))
    gates = {"dense": nn.Linear(64, 16, bias=False), "quantized": nn.QuantizedLinear(64, 16, bias=False, group_size=32, bits=8)}
    a, res = mx.random.normal((1, 1, 128), key=mx.random.key(3)), mx.random.normal((1, 1, 64), key=mx.random.key(4))
    for kind, gate in gates.items():
        router = QLinear(gate.weight, gate.scales, gate.biases, 8, 32) if kind == "quantized" else gate.weight
        h, xn, logits = tail_reference(a, res, Tail(QLinear(o.weight, o.scales, o.biases, 8, 32), norm.weight, 1e-5, router))
        want_h = res + o(a)
        for got, want in ((h, want_h), (xn, norm(want_h)), (logits, gate(norm(want_h)))):
            assert mx.abs(got.reshape(-1) - want.reshape(-1)).max().item() <= 1e-5, kind


# ---- GPU (run on the GPU machine: pytest -m gpu) ----------------------------------------------
