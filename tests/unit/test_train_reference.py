"""tools/train_reference_moe.py end to end on a tiny corpus, in the layout with
shared experts (qwen2_moe): a complete HF repo that transformers, mlx-lm and
mlxmoe's split + node all load, with the training report."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxmoe.model.load import load_bundle
from mlxmoe.bundle.split import split

REPO = Path(__file__).resolve().parents[2]
SEP = "\n<|endoftext|>\n"
DOCS = {
    "code": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)],
    "prose": [f"The {w} walked to the market on day {i} and bought bread." for i, w in
              enumerate(["cat", "dog", "fox", "owl"] * 15)],
}


def write_corpus(d: Path) -> Path:
    import hashlib

    domains = {}
    for dom, docs in DOCS.items():
        (d / dom).mkdir(parents=True)
        files = {}
        for split_, part in (("train", docs[:50]), ("heldout", docs[50:])):
            text = SEP.join(part) + "\n"
            (d / dom / f"{split_}.txt").write_text(text)
            files[split_] = {"path": f"{dom}/{split_}.txt", "bytes": len(text.encode()), "documents": len(part),
                             "sha256": hashlib.sha256(text.encode()).hexdigest()}
        domains[dom] = {"files": files, "sources": ["test"]}
    (d / "MANIFEST.json").write_text(json.dumps({"domains": domains, "total_bytes": 1}))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    out = d / "repo"
    cmd = [sys.executable, str(REPO / "tools" / "train_reference_moe.py"), "--arch", "qwen2_moe",
           "--corpus", str(write_corpus(d / "corpus")), "--out", str(out), "--steps", "3", "--batch", "2",
           "--seq-len", "32", "--layers", "2", "--experts", "4", "--top-k", "2", "--hidden", "32", "--heads", "2",
           "--kv-heads", "1", "--moe-intermediate", "16", "--shared-intermediate", "32", "--vocab", "300",
           "--warmup", "1", "--eval-max-tokens", "200", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_writes_a_released_qwen2_moe_layout(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] == 4 and cfg["shared_expert_intermediate_size"] == 32
    names = set(json.loads((trained / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (trained / "model.safetensors.index.json").exists() else set(mx.load(str(trained / "model.safetensors")))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in names and "model.layers.0.mlp.shared_expert_gate.weight" in names
    report = json.loads((trained / "training_report.json").read_text())
    assert set(report["eval"]["domains"]) == set(DOCS) and report["model"]
    assert "chat_template" in json.loads((trained / "tokenizer_config.json").read_text())


def test_split_node_equals_transformers(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    split(str(trained), tmp_path / "b", 2, bits=None, trunk_bits=None)
    ids = [5, 17, 42, 7, 99]
    ours = np.array(load_bundle(tmp_path / "b").model(mx.array([ids]))[0].astype(mx.float32))
    hf = AutoModelForCausalLM.from_pretrained(str(trained), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)
