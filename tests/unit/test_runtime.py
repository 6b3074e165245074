"""Node runtime: exact where it claims to be (vs mlx-lm and vs transformers
with the router masked the same way), sessions, generation, bad input."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny
from mlxmoe.bundle.arch import normalize_config
from mlxmoe.errors import BundleError, ContextOverflow, ManifestError, MlxMoeError, SessionBusy
from mlxmoe.bundle.manifest import group_file
from mlxmoe.node.contract import GenParams
from mlxmoe.model.load import load_bundle
from mlxmoe.node.batch import without
from mlxmoe.node.engine import Node
from mlxmoe.bundle.split import split

IDS = [[3, 17, 99, 250, 7, 42, 11, 300, 5, 64]]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """arch -> (hf dir, unquantized bundle split in 2 groups with overlay {1} at every layer)."""
    cache = {}

    def get(arch, **kw):
        if arch not in cache:
            src = tiny.make_checkpoint(arch, tmp_path_factory.mktemp(arch))
            out = tmp_path_factory.mktemp("b") / arch
            split(str(src), out, 2, overlay={"all": [1]}, bits=None, trunk_bits=None, **kw)
            cache[arch] = (src, out)
        return cache[arch]

    return get


from mlxmoe.model.reference import mlx_lm_model  # noqa: E402


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_all_eligible_node_equals_mlx_lm(bundles, arch):
    src, b = bundles(arch)
    full = load_bundle(b, None)
    diff = mx.abs(full.model(mx.array(IDS)) - mlx_lm_model(src)(mx.array(IDS))).max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_full_bundle_equals_transformers(bundles, arch):
    src, b = bundles(arch)
    ours = np.array(load_bundle(b, None).model(mx.array(IDS)))
    ref = tiny.hf_model(src)(torch.tensor(IDS)).logits.detach().numpy()
    assert np.abs(ours - ref).max() <= (1e-3 if arch == "gpt_oss" else 1e-4)  # gpt_oss: YaRN rope in float32


def test_quantized_node_identical_to_mlx_lm_same_quantization(tmp_path, ckpt):
    src = ckpt("qwen3_moe")
    m = split(str(src), tmp_path / "q", 1, bits=4, group_size=32, trunk_bits=8)
    ours = load_bundle(tmp_path / "q", 0).model
    ref = mlx_lm_model(src, m)  # mlx-lm's model, quantized by the split's rule
    assert isinstance(ref.model.layers[0].mlp.switch_mlp.up_proj, nn.QuantizedSwitchLinear) if hasattr(nn, "QuantizedSwitchLinear") else True
    assert isinstance(ref.model.layers[0].self_attn.q_proj, nn.QuantizedLinear) and ref.model.layers[0].self_attn.q_proj.bits == 8
    assert isinstance(ref.model.layers[0].mlp.gate, nn.Linear) and not isinstance(ref.model.layers[0].mlp.gate, nn.QuantizedLinear)
    a, r = ours(mx.array(IDS)), ref(mx.array(IDS))
    assert mx.array_equal(a, r).item(), mx.abs(a - r).max().item()


# ---- the independent reference: transformers with its router logits masked --------------------

def mask_hf_routers(model, eligible_by_layer, n_experts):
    """Reference masking: logits of non-eligible experts -> -inf before the
    model's own softmax / top-k / renormalisation (Qwen/Mixtral routers)."""
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "mlp", None) or layer.block_sparse_moe
        router = getattr(block, "gate", None)
        if i not in eligible_by_layer or not hasattr(router, "top_k"):
            continue
        mask = torch.full((n_experts,), float("-inf"))
        mask[eligible_by_layer[i]] = 0.0

        def forward(h, r=router, mask=mask):
            h = h.reshape(-1, r.hidden_dim)
            logits = F.linear(h, r.weight) + mask
            probs = F.softmax(logits, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, r.top_k, dim=-1)
            if getattr(r, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        router.forward = forward
    return model


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("group", [0, 1])
def test_masked_node_equals_masked_transformers(bundles, arch, group):
    src, b = bundles(arch)
    node = load_bundle(b, group)
    m = node.manifest
    eligible = {l: m.eligible(group, l) for l in m.moe_layers}
    assert all(1 in e for e in eligible.values())  # the overlay is eligible everywhere
    ref = mask_hf_routers(tiny.hf_model(src), eligible, m.n_experts)
    want = ref(torch.tensor(IDS)).logits.detach().numpy()
    got = np.array(node.model(mx.array(IDS)))
    assert np.abs(got - want).max() <= 1e-4
    unmasked = tiny.hf_model(src)(torch.tensor(IDS)).logits.detach().numpy()
    assert np.abs(got - unmasked).max() > 1e-3  # masking really changed the answer


def test_deepseek_masked_never_selects_non_eligible(bundles):
    src, b = bundles("deepseek_v3")
    node = load_bundle(b, 1)
    block = node.blocks[node.manifest.moe_layers[0]]
    x = mx.random.normal((1, 16, 64))
    inds, _ = block.gate(x)
    assert set(np.array(inds).ravel()) <= set(node.manifest.eligible(1, node.manifest.moe_layers[0]))
    full = load_bundle(b, None)
    assert mx.array_equal(full.blocks[1].gate(x)[0], mlx_lm_model(src).model.layers[1].mlp.gate(x)[0]).item()


def test_poisoned_non_eligible_experts_are_never_touched(tmp_path):
    """Experts outside group 0 ∪ overlay are NaN in the checkpoint: the node's
    output is finite and equals the masked reference of the clean model."""
    eligible = {0, 1, 2, 3, 6}  # group 0 = 0..3, overlay = {6}

    def poison(name, p):  # transformers v5 keeps experts fused in memory: [n_experts, ...]
        if ".experts." in name:
            p[[e for e in range(8) if e not in eligible]] = float("nan")

    clean = tiny.make_checkpoint("qwen3_moe", tmp_path / "clean", seed=3)
    bad = tiny.make_checkpoint("qwen3_moe", tmp_path / "bad", seed=3, poison=poison)
    split(str(bad), tmp_path / "b", 2, overlay={"all": [6]}, bits=None, trunk_bits=None)
    got = np.array(load_bundle(tmp_path / "b", 0).model(mx.array(IDS)))
    assert np.isfinite(got).all()
    ref = mask_hf_routers(tiny.hf_model(clean), {l: sorted(eligible) for l in range(3)}, 8)
    assert np.abs(got - ref(torch.tensor(IDS)).logits.detach().numpy()).max() <= 1e-4
    # and the overlay expert 6 is used exactly when eligible: without it, the answer differs
    no_overlay = mask_hf_routers(tiny.hf_model(clean), {l: [0, 1, 2, 3] for l in range(3)}, 8)
    assert np.abs(got - no_overlay(torch.tensor(IDS)).logits.detach().numpy()).max() > 1e-3


# ---- node: sessions, generation --------------------------------------------------------------

@pytest.fixture(scope="module")
def qnode_bundle(tmp_path_factory):
    src = tiny.make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("src"), seed=1)
    out = tmp_path_factory.mktemp("qb") / "b"
    split(str(src), out, 2, bits=4, group_size=32, trunk_bits=8, kv_bits=8)
    return out


class Counting:
    """Wraps a model to count the tokens fed to it (prefix-reuse checks)."""

    def __init__(self, model):
        self.model, self.fed = model, 0

    def __call__(self, x, *a, **k):
        self.fed += x.shape[-1]
        return self.model(x, *a, **k)

    def __getattr__(self, name):
        return getattr(self.model, name)


def greedy(node, sid, prompt, n=6, **kw):
    return [e.token for e in node.generate(sid, prompt, GenParams(max_tokens=n, **kw))]


def test_quantized_kv_cache_and_prefix_reuse(qnode_bundle):
    from mlx_lm.models.cache import QuantizedKVCache

    node = Node.load(qnode_bundle, 0)
    assert node.kv_bits == 8
    prompt = node.encode_chat([{"role": "user", "content": "def add(a, b):"}])
    first = greedy(node, "s", prompt)
    s = node.sessions.sessions["s"]
    assert all(isinstance(c, QuantizedKVCache) for c in s.cache)
    assert len(s.tokens) == len(prompt) + len(first)
    turn2 = prompt + first + node.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    counting = Counting(node.model)
    node.model = node.batch.model = counting
    second = greedy(node, "s", turn2)
    reused = counting.fed
    assert greedy(Node.load(qnode_bundle, 0), "fresh", turn2) == second  # reuse changes nothing but the work
    assert reused <= len(turn2) - len(prompt) + len(second) + 1  # only the new suffix was prefilled


def never(ids: list[int]):
    """An mlx-lm logits processor: the node never samples the template's turn start, and reports
    log-probabilities of the distribution it samples from."""
    return lambda tokens, logits: logits.at[..., mx.array(ids)].add(-mx.inf)


def test_node_matches_mlx_lm_generation_with_quantized_kv(qnode_bundle):
    from mlx_lm.generate import generate_step

    node = Node.load(qnode_bundle, None)  # every group: all experts eligible
    prompt = node.encode("the quick brown fox")
    ours = [(e.token, e.logprob) for e in node.generate(None, prompt, GenParams(max_tokens=8))]
    ref = [(int(t), float(lp[t])) for t, lp in generate_step(mx.array(prompt), node.model, max_tokens=8,
                                                               kv_bits=8, kv_group_size=32, quantized_kv_start=0,
                                                               logits_processors=[never(node.banned)])]
    assert [t for t, _ in ours] == [t for t, _ in ref]
    np.testing.assert_allclose([l for _, l in ours], [l for _, l in ref], atol=1e-5)


def test_logprobs_match_teacher_forcing(qnode_bundle):
    node = Node.load(qnode_bundle, 1, kv_bits=None)
    prompt = node.encode("le renard brun")
    evs = list(node.generate(None, prompt, GenParams(max_tokens=5)))
    toks = prompt + [e.token for e in evs]
    logits = node.logits(toks)
    lp = without(logits - mx.logsumexp(logits, axis=-1, keepdims=True), node.banned)  # the turn start is never drawn
    for i, e in enumerate(evs):
        assert abs(lp[len(prompt) - 1 + i, e.token].item() - e.logprob) < 1e-4


def test_lru_eviction_then_reprefill_loses_nothing(qnode_bundle):
    node = Node.load(qnode_bundle, 0)
    p1 = node.encode("the quick brown fox jumps over the lazy dog")
    p2 = node.encode("def add(a, b): return a + b")
    one = greedy(node, "a", p1)
    per_session = node.sessions.used()
    node.sessions.budget = int(per_session * 1.5)  # room for one session only
    greedy(node, "b", p2)
    assert node.sessions.sessions["a"].cache is None and node.sessions.evictions == 1
    again = greedy(node, "a", p1)
    assert again == one


def test_stop_strings_max_tokens_and_sampling(qnode_bundle):
    node = Node.load(qnode_bundle, 0)
    prompt = node.encode("Mixture of experts")
    evs = list(node.generate(None, prompt, GenParams(max_tokens=12)))
    text = "".join(e.text for e in evs)
    assert evs[-1].finish_reason in ("length", "stop") and len(evs) <= 12
    if len(text) > 4:
        stop = text[2:4]
        cut = list(node.generate(None, prompt, GenParams(max_tokens=12, stop=[stop])))
        assert "".join(e.text for e in cut) == text[: text.index(stop)]
        assert cut[-1].finish_reason == "stop"
    a = greedy(node, None, prompt, 8, temperature=0.9, top_p=0.9, seed=7)
    b = greedy(node, None, prompt, 8, temperature=0.9, top_p=0.9, seed=7)
    assert a == b


def test_bad_input_clear_errors_and_node_stays_up(qnode_bundle, tmp_path, ckpt):
    node = Node.load(qnode_bundle, 0)
    with pytest.raises(ContextOverflow, match="do not fit the context limit of 256"):
        list(node.generate("x", list(range(1, 300)), GenParams()))
    with pytest.raises(MlxMoeError, match="outside the vocabulary"):
        node.generate("x", [1, 99999], GenParams())
    small = Node.load(qnode_bundle, 0, kv_budget_bytes=2000)
    with pytest.raises(ContextOverflow, match="KV budget"):
        small.generate("x", node.encode("the quick brown fox"), GenParams(max_tokens=50))
    assert greedy(node, "ok", node.encode("hello"), 3)  # still serving
    # a bundle file from another model / another split
    other = tmp_path / "other"
    split(str(ckpt("qwen3_moe", seed=9)), other, 2, bits=4, group_size=32)
    mixed = tmp_path / "mixed"
    shutil.copytree(qnode_bundle, mixed)
    shutil.copy(other / group_file(1), mixed / group_file(1))
    with pytest.raises(BundleError, match=r"experts-group-01.safetensors: sha256 does not match"):
        load_bundle(mixed, 1)
    (mixed / group_file(1)).unlink()
    with pytest.raises(BundleError, match="experts-group-01.safetensors: missing"):
        load_bundle(mixed, 1)
    with pytest.raises(BundleError, match="group 5 does not exist"):
        load_bundle(mixed, 5)
    (mixed / "distribution.json").write_text("{}")
    with pytest.raises(ManifestError, match="not an mlxmoe distribution manifest"):
        load_bundle(mixed, 0)


def test_session_export_import_continues_identically(qnode_bundle):
    a, b = Node.load(qnode_bundle, 0), Node.load(qnode_bundle, 0)
    prompt = a.encode("the lazy dog")
    greedy(a, "s", prompt)
    state = a.export_session("s")
    b.import_session(state)
    nxt = state["tokens"] + a.encode(" and")
    assert greedy(a, "s", nxt) == greedy(b, "s", nxt)
    it = a.generate("s", nxt + a.encode(" then"), GenParams(max_tokens=4))
    next(it)
    with pytest.raises(SessionBusy, match="session s: still generating"):  # cache ahead of its tokens
        a.export_session("s")
    it.close()
    assert a.export_session("s")["tokens"][:len(nxt)] == nxt


def test_cli_run(qnode_bundle):
    from click.testing import CliRunner
    from mlxmoe.cli import main

    r = CliRunner().invoke(main, ["run", str(qnode_bundle), "--group", "auto", "-p", "hello", "-m", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["generated_tokens"] >= 1 and out["placement"]["best"] == out["group"]
    assert all(isinstance(t["logprob"], float) for t in out["tokens"])
    r = CliRunner().invoke(main, ["run", str(qnode_bundle), "--group", "x", "-p", "hi"])
    assert r.exit_code != 0 and "expected a group number" in r.output


def test_node_placement_score_equals_trunk_front_end(qnode_bundle):
    from mlxmoe.node.trunk import TrunkFrontend

    node, front = Node.load(qnode_bundle, 1), TrunkFrontend.load(qnode_bundle)
    toks = node.encode("the quick brown fox jumps")
    a, b = node.score(toks), front.score(toks)
    assert a.layers == b.layers == [node.manifest.moe_layers[0]]
    for g in a.scores:
        assert abs(a.scores[g] - b.scores[g]) < 1e-6
    assert sum(b.scores.values()) > 0 and b.margin >= 0


def test_prefill_then_generate_equals_plain_generate(qnode_bundle):
    node = Node.load(qnode_bundle, 0)
    prompt = node.encode("def add(a, b): return a + b and more text here")
    assert node.prefill("p", prompt) == len(prompt)
    assert node.prefill("p", prompt) == 0  # cached already
    counting = Counting(node.model)
    node.model = node.batch.model = counting
    warm = greedy(node, "p", prompt)
    assert counting.fed <= len(warm) + 1  # only the last prompt token was re-fed
    assert warm == greedy(node, "cold", prompt)


def test_full_model_of_a_shuffled_grouping_masks_like_a_node(tmp_path, ckpt):
    """Non-contiguous groups: the full model still equals mlx-lm, and masking it
    to a group's eligible set equals that group's node."""
    groups = [[0, 3, 5, 6], [1, 2, 4, 7]]
    src = ckpt("qwen3_moe")
    m = split(str(src), tmp_path / "b", 2, grouping={"groups": groups}, overlay={"all": [1]}, bits=None, trunk_bits=None)
    full = load_bundle(tmp_path / "b", None)
    assert mx.abs(full.model(mx.array(IDS)) - mlx_lm_model(src)(mx.array(IDS))).max().item() <= 1e-4
    full.set_eligible({l: m.eligible(0, l) for l in m.moe_layers})
    node = load_bundle(tmp_path / "b", 0)
    assert mx.abs(full.model(mx.array(IDS)) - node.model(mx.array(IDS))).max().item() <= 1e-5


def test_node_keeps_kv_unquantized_where_the_backend_cannot_run_quantized_attention(ckpt, tmp_path, monkeypatch):
    """MLX's CUDA backend lacks quantized matmuls for some head sizes: a GPU node
    checks one quantized decode step at load and, if it fails, says so and
    decodes with an unquantized cache instead of failing at the first token."""
    import mlx.core as mx
    from mlx_lm.models import base

    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node
    from mlxmoe.bundle.split import split

    split(str(ckpt("qwen3_moe")), tmp_path / "b", 2, bits=4, group_size=32, kv_bits=8)

    def unsupported(*a, **kw):
        raise RuntimeError("[quantized_matmul] No implementation for problem shape")

    monkeypatch.setattr(base, "quantized_scaled_dot_product_attention", unsupported)
    cpu = mx.default_device()
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu if cpu == mx.cpu else cpu)  # the check runs on GPUs only
    node = Node.load(str(tmp_path / "b"), 0, verify=False)
    monkeypatch.undo()
    assert node.kv_bits is None and "kv-bits 8" in node.info()["kv_note"]
    assert len([e for e in node.generate(None, [1, 2, 3], GenParams(max_tokens=5, temperature=0.0))]) == 5


def test_gpt_oss_generates_with_default_kv_bits(bundles):
    """split's default is 8-bit KV; mlx-lm cannot quantize gpt_oss's (attention sinks, sliding-window
    RotatingKVCache): the node keeps it 16-bit, says so, and generates as with --kv-bits 16."""
    _, b = bundles("gpt_oss")
    node = Node.load(b, 0)  # the manifest's kv_bits: 8
    assert node.kv_bits is None and "unquantized" in node.kv_note and node.info()["kv_note"] == node.kv_note
    plain = Node.load(b, 0, kv_bits=None)
    assert plain.kv_note is None
    params = GenParams(max_tokens=5)
    assert [e.token for e in node.generate(None, IDS[0], params)] == [e.token for e in plain.generate(None, IDS[0], params)]


def test_sliding_window_caches_stay_unquantized():
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    from mlxmoe.node.batch_cache import quantize

    caches = [KVCache(), RotatingKVCache(max_size=8)]
    for c in caches:
        c.update_and_fetch(mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 3, 64)))
    out = quantize(caches, 64, 8)
    assert isinstance(out[0], QuantizedKVCache) and isinstance(out[1], RotatingKVCache)


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_logprobs_are_mlx_lms_for_the_chosen_token_and_its_alternatives(bundles, penalty):
    """Greedy and top_logprobs from one distribution, mlx-lm's own (after its logits processors): the chosen
    token is the first alternative, with the same log-probability."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    src, b = bundles("qwen3_moe")
    node = Node.load(b, None, kv_bits=None)
    events = list(node.generate(None, IDS[0], GenParams(max_tokens=6, repetition_penalty=penalty, top_logprobs=4)))
    procs = make_logits_processors(repetition_penalty=penalty if penalty != 1.0 else None, repetition_context_size=20)
    procs.append(never(node.banned))
    assert node.banned
    ref = list(generate_step(mx.array(IDS[0]), mlx_lm_model(src), max_tokens=6, logits_processors=procs))
    for ev, (tok, lps) in zip(events, ref):
        assert ev.token == int(tok)
        assert ev.logprob == pytest.approx(lps[tok].item(), abs=1e-4)
        top = np.argsort(-np.array(lps))[:4]
        assert [t["token"] for t in ev.top_logprobs] == top.tolist()
        assert [t["logprob"] for t in ev.top_logprobs] == pytest.approx(np.array(lps)[top].tolist(), abs=1e-4)
        assert ev.top_logprobs[0]["token"] == ev.token and ev.piece == node.tokenizer.decode([ev.token])


def test_a_banned_token_is_out_of_the_distribution():
    from mlxmoe.node.batch import Greedy

    lp = mx.log(mx.array([[0.5, 0.3, 0.2]]))
    out = without(lp, [0])
    assert np.allclose(np.exp(np.array(out)), [[0, 0.6, 0.4]], atol=1e-6)
    g = Greedy([0])
    assert g(lp).tolist() == [1] and g.calls[0].tolist() == pytest.approx([np.log(0.6)], abs=1e-6)
