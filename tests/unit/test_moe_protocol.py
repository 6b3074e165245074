"""The MoE-block protocol (mlxmoe/model/moe.py): one MoeState per MoE layer,
what each field changes, and that the spans setting them leave nothing behind."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxmoe.model import moe

E, K, LAYERS = 8, 2, 3
IDS = mx.array([[3, 17, 99, 50, 7, 42, 11, 30]])


def tiny_model(seed=0):
    from mlx_lm.models.qwen3_moe import Model, ModelArgs

    args = ModelArgs(model_type="qwen3_moe", hidden_size=32, num_hidden_layers=LAYERS, intermediate_size=64,
                     num_attention_heads=2, num_experts=E, num_experts_per_tok=K, decoder_sparse_step=1,
                     mlp_only_layers=[], moe_intermediate_size=16, rms_norm_eps=1e-6, vocab_size=128,
                     num_key_value_heads=1, head_dim=16, rope_theta=1e4, tie_word_embeddings=False,
                     max_position_embeddings=256, norm_topk_prob=True)
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def installed(local_ids=None, seed=0):
    """A tiny mlx-lm model with every MoE layer installed (local_ids: the
    experts held, in row order; their rows are cut from the full model's)."""
    model = tiny_model(seed)
    for l, layer in enumerate(model.layers):
        if local_ids is not None:
            rows = mx.array(local_ids)
            for _, lin in layer.mlp.switch_mlp.named_modules():
                if "weight" in lin and lin.weight.ndim == 3:
                    lin.weight = lin.weight[rows]
        moe.install(layer.mlp, "gate", "switch_mlp", l, "softmax", E, local_ids)
    return model


def blocks(model):
    return [layer.mlp for layer in model.layers]


def test_one_state_per_layer_shared_by_block_gate_experts_and_layer():
    model = installed()
    for l, b in enumerate(blocks(model)):
        s = moe.state_of(b)
        assert s.layer == l and moe.state_of(b.gate) is s and moe.state_of(b.switch_mlp) is s
        moe.set_layer_step(model.layers[l], b, None, (None, None))
        assert moe.state_of(model.layers[l]) is s and not isinstance(model.layers[l], moe.MoeLayer)
    assert len({id(moe.state_of(b)) for b in blocks(model)}) == LAYERS


def test_all_eligible_is_mlx_lms_model():
    ref, model = tiny_model(), installed()
    assert [k for k, _ in tree_flatten(model.parameters())] == [k for k, _ in tree_flatten(ref.parameters())]
    for b in blocks(model):
        s = moe.state_of(b)
        assert (s.mask, s.g2l, s.full, s.step, s.hook, s.dynamic, s.records) == (None,) * 7
        assert isinstance(b, moe.MoeBlock) and isinstance(b.gate, moe.MaskedLinearGate)
    assert mx.array_equal(model(IDS), ref(IDS)).item()


def test_set_eligible_routes_only_to_the_set_and_clears():
    model, seen = installed(), []
    for b in blocks(model):
        moe.state_of(b).outputs = lambda layer, inds, y: seen.append(np.array(inds))
        moe.set_eligible(b, E, [1, 4, 6])
    masked = model(IDS)
    assert len(seen) == LAYERS and set(np.concatenate([s.reshape(-1) for s in seen]).tolist()) <= {1, 4, 6}
    for b in blocks(model):
        moe.set_eligible(b, E, None)
        moe.state_of(b).outputs = None
    assert mx.array_equal(model(IDS), tiny_model()(IDS)).item()
    assert not mx.allclose(masked, model(IDS)).item()


def test_local_rows_equal_the_masked_full_model_and_record_full_logits():
    ids = [6, 1, 4]  # local row order differs from global order
    node, full = installed(ids), installed()
    for b in blocks(full):
        moe.set_eligible(b, E, ids)
    gate = blocks(node)[0].gate
    assert isinstance(gate, moe.LocalLinearGate) and gate.weight.shape[0] == 3 and moe.state_of(gate).g2l is None
    assert mx.allclose(node(IDS), full(IDS), atol=1e-5).item()
    with moe.GateRecorder([b.gate for b in blocks(node)]) as rec_node, \
            moe.GateRecorder([b.gate for b in blocks(full)]) as rec_full:
        node(IDS), full(IDS)
    got, want = rec_node.by_layer(), rec_full.by_layer()
    assert all(got[l].shape[-1] == E and mx.allclose(got[l], want[l], atol=1e-5).item() for l in range(LAYERS))


def test_recording_and_a_dynamic_mask_compose():
    """Within both spans: raw logits recorded, the mask applied per token (the
    same result as the fixed mask it returns), and afterwards nothing is left."""
    model, fixed, seen = installed(), installed(), []
    mask = moe.eligible_mask([0, 3, 5], E)
    for b in blocks(fixed):
        moe.set_eligible(b, E, [0, 3, 5])

    def dynamic(layer, logits):
        seen.append((layer, logits))
        return mask

    gates = [b.gate for b in blocks(model)]
    with moe.dynamic_mask(gates, dynamic), moe.GateRecorder(gates) as rec:
        y = model(IDS)
    assert mx.array_equal(y, fixed(IDS)).item()
    assert [l for l, _ in rec.records] == [l for l, _ in seen] == list(range(LAYERS))
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(rec.records, seen))  # unmasked logits
    assert all(moe.state_of(g).dynamic is None and moe.state_of(g).records is None for g in gates)
    assert mx.array_equal(model(IDS), tiny_model()(IDS)).item()


def test_recording_stops_the_forward_at_stop_at():
    model = installed()
    with moe.GateRecorder([b.gate for b in blocks(model)], stop_at=1) as rec:
        model(IDS)
    assert [l for l, _ in rec.records] == [0, 1]
    assert all(moe.state_of(b).stop_at is None for b in blocks(model))


def test_a_hook_replaces_the_block_and_unhooked_is_its_own_forward():
    model, calls = installed(), []
    want = [b(mx.ones((1, 2, 32))) for b in blocks(model)]

    def hook(block, x):
        calls.append(moe.state_of(block).layer)
        return moe.unhooked(block, x) * 2

    with moe.hooked(blocks(model), [hook] * LAYERS):
        got = [b(mx.ones((1, 2, 32))) for b in blocks(model)]
    assert calls == list(range(LAYERS)) and all(mx.allclose(g, 2 * w).item() for g, w in zip(got, want))
    assert all(moe.state_of(b).hook is None for b in blocks(model))


def test_the_one_token_step_and_own_code():
    model, calls = installed(), []
    b = blocks(model)[0]
    x1, x2 = mx.ones((1, 1, 32)), mx.ones((1, 2, 32))
    want = b(x1)
    s = moe.state_of(b)
    s.step, s.step_args = (lambda block, x, args: calls.append(args) or mx.zeros_like(x)), ("cached",)
    assert mx.array_equal(b(x1), mx.zeros_like(x1)).item() and calls == [("cached",)]
    b(x2)  # a prompt runs mlx-lm's code
    with moe.own_code(b):
        assert mx.array_equal(b(x1), want).item()
    assert len(calls) == 1 and s.step is not None


@pytest.mark.parametrize("span", ["none", "mask", "recording", "dynamic", "hook"])
def test_the_layer_step_runs_only_for_one_token_with_plain_routing(span):
    model, calls = installed(), []
    layer = model.layers[0]
    moe.set_layer_step(layer, layer.mlp, lambda lay, x, mask, cache, s: calls.append(s) or x, ("t", "f"))
    assert isinstance(layer, moe.MoeLayer)
    s, x1 = moe.state_of(layer), mx.ones((1, 1, 32))
    if span == "mask":
        moe.set_eligible(layer.mlp, E, [0, 1])
    elif span == "recording":
        s.records = []
    elif span == "dynamic":
        s.dynamic = lambda l, logits: None
    elif span == "hook":
        s.hook = lambda block, x: mx.zeros_like(x)
    layer(x1)
    layer(mx.ones((1, 3, 32)))
    assert calls == ([s] if span == "none" else [])
