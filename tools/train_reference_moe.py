#!/usr/bin/env python3
"""Train mlxmoe's small reference Mixture-of-Experts model from scratch.

Input: the labelled corpus written by tools/build_corpus.py (corpus/<domain>/
{train,heldout}.txt + corpus/MANIFEST.json).

Output (--out): a complete Hugging Face repo in the exact layout of a released
Qwen3-MoE (or Qwen1.5/Qwen2-MoE, with shared experts) checkpoint:

    config.json                      (+ released-checkpoint keys num_experts, rope_theta)
    model-0000X-of-0000Y.safetensors (bfloat16, per-expert tensors
    model.safetensors.index.json      model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight)
    generation_config.json
    tokenizer.json, tokenizer_config.json (byte-level BPE, ChatML chat_template,
                                           eos <|im_end|>)
    TRAINING.md, training_report.json (config, tokens seen, wall time, GPU,
                                       per-domain held-out loss/perplexity vs a
                                       unigram baseline, expert load statistics)

Needs: torch, transformers >= 5, tokenizers, numpy, safetensors (pip).

Phases:
  1. tokenizer + tokenised corpus, cached in <corpus>/.cache/<key>/ (cheap; do it
     on the CPU with --prepare-only, then carry the corpus dir to the GPU box);
  2. training (bf16 autocast, AdamW, cosine schedule, load-balancing aux loss);
  3. save (bf16) + reload the saved repo + held-out evaluation + report.

Examples:
  python3 tools/train_reference_moe.py --prepare-only
  python3 tools/train_reference_moe.py --steps 5 --batch 2 --seq-len 64 --layers 2 \\
      --experts 8 --top-k 2 --hidden 64 --moe-intermediate 32 --out /tmp/tiny
  python3 tools/train_reference_moe.py --time-budget 270 --out out/reference-moe   # GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEP = "<|endoftext|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2/Qwen3 pre-tokenizer split pattern
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEM_PROMPT = "You are a helpful assistant."
REQUESTS = {
    "code": ["Write some Python code.", "Show me a module of the Python standard library.",
             "Can you write a Python function for me?"],
    "prose_en": ["Tell me a fortune.", "Say something witty.", "Give me a quote."],
    "prose_de": ["Erzähl mir einen Spruch.", "Sag etwas Witziges.", "Gib mir ein Zitat."],
    "prose_es": ["Dime un refrán.", "Cuéntame algo ingenioso.", "Dame una cita."],
    "prose_it": ["Dimmi un aforisma.", "Raccontami una battuta.", "Dammi una citazione."],
    "structured": ["Show me some ISO code records.", "List some entries of the iso-codes database.",
                   "Give me some ISO data as JSON or CSV."],
}
CONTINUE = {
    "code": "Continue this Python code:", "prose_en": "Continue this text:",
    "prose_de": "Setze diesen Text fort:", "prose_es": "Continúa este texto:",
    "prose_it": "Continua questo testo:", "structured": "Continue these records:",
}
CACHE_VERSION = 2


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ============================================================== corpus & tokenizer


def read_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    return [d for d in text.split("\n" + SEP + "\n") if d]


def load_corpus(corpus: Path) -> tuple[dict, dict]:
    mpath = corpus / "MANIFEST.json"
    if not mpath.is_file():
        raise SystemExit(f"train_reference_moe: {mpath} not found -- run tools/build_corpus.py first")
    manifest = json.loads(mpath.read_text())
    docs = {}
    for domain in sorted(manifest["domains"]):
        docs[domain] = {s: read_docs(corpus / domain / f"{s}.txt") for s in ("train", "heldout")}
    return manifest, docs


def chat_sample(domain: str, doc: str, rng: random.Random) -> str:
    """A user/assistant exchange built from an excerpt of a training document."""
    lines = doc.split("\n")
    if len(doc) > 2400:  # excerpt from a long document, at line boundaries
        start = rng.randrange(len(lines))
        out = []
        for ln in lines[start:]:
            if sum(len(x) + 1 for x in out) + len(ln) > 2000:
                break
            out.append(ln)
        doc = "\n".join(out).strip("\n") or doc[:2000]
        lines = doc.split("\n")
    msgs = []
    if rng.random() < 0.25:
        msgs.append(("system", SYSTEM_PROMPT))
    if len(lines) >= 3 and rng.random() < 0.5:
        cut = rng.randrange(1, len(lines) - 1)
        ask = CONTINUE.get(domain, "Continue this code:" if domain.startswith("code") else "Continue this text:")
        msgs.append(("user", ask + "\n" + "\n".join(lines[:cut])))
        msgs.append(("assistant", "\n".join(lines[cut:])))
    else:
        msgs.append(("user", rng.choice(REQUESTS.get(domain, ["Write something."]))))
        msgs.append(("assistant", doc))
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in msgs)


def train_tokenizer(docs: dict, vocab_size: int, seed: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # balanced sample: at most ~2.5 MB of train text per domain
    texts = []
    for domain in sorted(docs):
        rng = random.Random(f"{seed}-tok-{domain}")
        order = list(range(len(docs[domain]["train"])))
        rng.shuffle(order)
        budget = 2_500_000
        for i in order:
            d = docs[domain]["train"][i]
            texts.append(d)
            budget -= len(d)
            if budget <= 0:
                break
    tok.train_from_iterator(texts, trainer, length=len(texts))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def save_hf_tokenizer(tok, out: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (chat_template inside, loadable by transformers 4 and 5)."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {}
    for t in SPECIALS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def prepare(args) -> dict:
    """Tokenizer + token streams, cached under <corpus>/.cache/<key>/."""
    corpus = Path(args.corpus)
    mpath = corpus / "MANIFEST.json"
    if not mpath.is_file():
        raise SystemExit(f"train_reference_moe: {mpath} not found -- run tools/build_corpus.py first")
    manifest = json.loads(mpath.read_text())
    unseen = manifest.get("unseen", {})
    key_src = json.dumps({
        "v": CACHE_VERSION, "vocab": args.vocab, "seed": args.seed, "chat_frac": args.chat_frac,
        "max_pos": args.max_position_embeddings,
        "corpus": {d: {s: f["sha256"] for s, f in v["files"].items()} for d, v in manifest["domains"].items()},
        **({"unseen": {k: v["files"]["heldout"]["sha256"] for k, v in unseen.items()}} if unseen else {}),
    }, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cdir = corpus / ".cache" / key
    if (cdir / "tokens.npz").is_file() and (cdir / "meta.json").is_file():
        log(f"[prepare] using cached tokens {cdir}")
        meta = json.loads((cdir / "meta.json").read_text())
    else:
        from tokenizers import Tokenizer
        _, docs = load_corpus(corpus)
        t0 = time.time()
        tok = train_tokenizer(docs, args.vocab, args.seed)
        log(f"[prepare] tokenizer trained: vocab={tok.get_vocab_size()} in {time.time()-t0:.1f}s")
        tmp = cdir.with_name(cdir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf_tokenizer(tok, tmp / "tokenizer", args.max_position_embeddings)
        tok = Tokenizer.from_file(str(tmp / "tokenizer" / "tokenizer.json"))
        eot = tok.token_to_id(SEP)
        arrays, meta = {}, {"key": key, "domains": {}, "vocab_size": tok.get_vocab_size(),
                            "special_ids": {t: tok.token_to_id(t) for t in SPECIALS}}
        for domain in sorted(docs):
            rng = random.Random(f"{args.seed}-chat-{domain}")
            train_texts = list(docs[domain]["train"])
            n_chat = 0
            for d in docs[domain]["train"]:
                if rng.random() < args.chat_frac:
                    train_texts.append(chat_sample(domain, d, rng))
                    n_chat += 1
            rng.shuffle(train_texts)
            info = {"train_docs": len(docs[domain]["train"]), "chat_samples": n_chat,
                    "heldout_docs": len(docs[domain]["heldout"])}
            for split, texts in (("train", train_texts), ("heldout", docs[domain]["heldout"])):
                enc = tok.encode_batch(texts, add_special_tokens=False)
                ids = []
                for e in enc:
                    ids.extend(e.ids)
                    ids.append(eot)
                arr = np.asarray(ids, dtype=np.uint16)
                arrays[f"{domain}/{split}"] = arr
                info[f"{split}_tokens"] = int(arr.size)
                info[f"{split}_bytes"] = sum(len(t.encode()) for t in texts)
            meta["domains"][domain] = info
            log(f"[prepare] {domain:11s} train={info['train_tokens']:9d} tok "
                f"({info['train_bytes']/max(info['train_tokens'],1):.2f} B/tok) heldout={info['heldout_tokens']:8d}")
        meta["unseen"] = {}
        for kind in sorted(unseen):  # held-out only: kinds of text no training domain contains
            enc = tok.encode_batch(read_docs(corpus / unseen[kind]["files"]["heldout"]["path"]), add_special_tokens=False)
            arrays[f"unseen:{kind}/heldout"] = np.asarray([i for e in enc for i in e.ids + [eot]], dtype=np.uint16)
            meta["unseen"][kind] = {"heldout_tokens": int(arrays[f"unseen:{kind}/heldout"].size)}
        np.savez_compressed(tmp / "tokens.npz", **arrays)  # small enough to carry to the GPU box
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(cdir, ignore_errors=True)
        tmp.rename(cdir)
        log(f"[prepare] cached in {cdir} ({time.time()-t0:.1f}s)")
    z = np.load(cdir / "tokens.npz")
    streams = {k: z[k] for k in z.files}
    return {"dir": cdir, "meta": meta, "streams": streams, "manifest": manifest}


# ============================================================== model


def build_config(args, vocab_size: int, special_ids: dict):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=args.norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=[], output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef if args.balance == "hf" else 0.0,  # global: added by the loop
        bos_token_id=None, eos_token_id=special_ids["<|im_end|>"], pad_token_id=special_ids["<|endoftext|>"],
        initializer_range=0.02, use_cache=True,
    )
    if args.arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
                                          attention_bias=False, **common)
    elif args.arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=args.intermediate,
                                          shared_expert_intermediate_size=args.shared_intermediate,
                                          qkv_bias=True, **common)
    else:
        raise SystemExit(f"unknown --arch {args.arch}")
    return cfg


def _grouped_mm_fn():
    import torch
    import torch.nn.functional as F
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def fast_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Same maths as transformers' Qwen{2,3}MoeExperts.forward, on bf16 grouped GEMMs.

    transformers' own grouped_mm path casts the activations to the (fp32 master)
    weight dtype, which drops torch's grouped GEMM to a slow per-expert loop; here
    the weights are cast to bf16 instead (autograd keeps fp32 master grads).
    """
    import torch

    gmm = _grouped_mm_fn()
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    E = self.num_experts
    flat = top_k_index.reshape(-1)
    ids, perm = torch.sort(flat, stable=True)
    x = hidden_states[perm // k].to(torch.bfloat16)
    # histc: int on CUDA (no host sync), float on CPU (no int kernel there)
    counts = torch.histc(ids.to(torch.int32 if ids.is_cuda else torch.float32), bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = self.gate_up_proj.to(torch.bfloat16)          # [E, 2I, H]
    h = gmm(x, gu.transpose(-2, -1), offs=offs)         # [S, 2I]
    gate, up = h.chunk(2, dim=-1)
    h = self.act_fn(gate) * up
    dn = self.down_proj.to(torch.bfloat16)             # [E, H, I]
    y = gmm(h, dn.transpose(-2, -1), offs=offs).float()  # [S, H]
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1).float()
    out = torch.empty_like(y)
    out[perm] = y
    return out.view(T, k, H).sum(dim=1).to(hidden_states.dtype)


def patch_experts(model, impl: str) -> str:
    import types
    if impl != "fast":
        return impl
    n = 0
    for mod in model.modules():
        if type(mod).__name__.endswith("MoeExperts") and hasattr(mod, "gate_up_proj"):
            mod.forward = types.MethodType(fast_experts_forward, mod)
            n += 1
    return f"fast(bf16 grouped_mm, {n} blocks)"


def unpatch_experts(model) -> None:
    for mod in model.modules():
        if "forward" in mod.__dict__ and type(mod).__name__.endswith("MoeExperts"):
            del mod.forward


# ============================================================== evaluation


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    n = min(len(stream), max_tokens) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int64)


def evaluate(model, streams: dict, domains: list, seq_len: int, max_tokens: int, batch: int, device,
             autocast_dtype, top_k: int, n_experts: int, n_layers: int, vocab: int, routing: bool = True):
    """Per-domain held-out loss + unigram baselines + expert load statistics."""
    import torch
    import torch.nn.functional as F

    model.eval()
    res = {"domains": {}, "layers": []}
    global_counts = np.zeros(vocab, dtype=np.float64)
    for d in domains:
        global_counts += np.bincount(streams[f"{d}/train"], minlength=vocab)
    glob_logp = np.log((global_counts + 0.5) / (global_counts.sum() + 0.5 * vocab))
    loads = {d: np.zeros((n_layers, n_experts), dtype=np.float64) for d in domains}
    mass = {d: np.zeros(n_layers, dtype=np.float64) for d in domains}
    ntok_route = {d: 0 for d in domains}
    for d in domains:
        win = eval_windows(streams[f"{d}/heldout"], seq_len, max_tokens)
        tot_nll, tot_n = 0.0, 0
        for i in range(0, len(win), batch):
            x = torch.from_numpy(win[i:i + batch]).to(device)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=autocast_dtype,
                                                 enabled=autocast_dtype is not None):
                out = model(input_ids=x, output_router_logits=routing, use_cache=False)
            logits = out.logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            tot_nll += float(nll)
            tot_n += x[:, 1:].numel()
            if routing and out.router_logits is not None:
                for li, rl in enumerate(out.router_logits):
                    p = torch.softmax(rl.float(), dim=-1)
                    tv, ti = torch.topk(p, top_k, dim=-1)
                    loads[d][li] += torch.bincount(ti.reshape(-1), minlength=n_experts).double().cpu().numpy()
                    mass[d][li] += float(tv.sum())
                ntok_route[d] += rl.shape[0]
        tr = streams[f"{d}/train"]
        cnt = np.bincount(tr, minlength=vocab).astype(np.float64)
        logp = np.log((cnt + 0.5) / (cnt.sum() + 0.5 * vocab))
        tgt = win[:, 1:].reshape(-1)
        uni = float(-logp[tgt].mean()) if tgt.size else float("nan")
        guni = float(-glob_logp[tgt].mean()) if tgt.size else float("nan")
        loss = tot_nll / max(tot_n, 1)
        res["domains"][d] = {"tokens": tot_n, "loss": loss, "ppl": math.exp(loss),
                             "unigram_loss": uni, "unigram_ppl": math.exp(uni),
                             "global_unigram_loss": guni}
    if routing and sum(ntok_route.values()):
        total = sum(loads.values())
        ntot = sum(ntok_route.values())
        for li in range(n_layers):
            frac = total[li] / total[li].sum()
            # domain-balanced load: mean over domains of each domain's load fractions
            per = [loads[d][li] / loads[d][li].sum() for d in domains if ntok_route[d]]
            bal = np.mean(per, axis=0)
            layer = {"layer": li, "load_min": float(frac.min()), "load_max": float(frac.max()),
                     "load_cv": float(frac.std() / frac.mean()),
                     "balanced_load_min": float(bal.min()), "balanced_load_max": float(bal.max()),
                     "balanced_load_cv": float(bal.std() / bal.mean()),
                     "balanced_load": [round(float(v), 5) for v in bal],
                     "uniform": 1.0 / n_experts,
                     "topk_mass_mean": float(sum(mass[d][li] for d in domains) / ntot),
                     "topk_mass_uniform_router": top_k / n_experts,
                     "load": [round(float(v), 5) for v in frac], "per_domain": {}}
            for d in domains:
                if not ntok_route[d]:
                    continue
                fd = loads[d][li] / loads[d][li].sum()
                layer["per_domain"][d] = {
                    "tv_vs_all": float(0.5 * np.abs(fd - frac).sum()),
                    "top_experts": [int(e) for e in np.argsort(-fd)[:6]],
                    "top6_share": float(np.sort(fd)[::-1][:6].sum()),
                }
            res["layers"].append(layer)
    model.train()
    return res


def unseen_losses(model, streams: dict, seq_len: int, max_tokens: int, batch: int, device) -> dict:
    """Next-token loss on each unseen kind of text (held out from training and from every suite)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    res = {}
    for key in sorted(k for k in streams if k.startswith("unseen:")):
        win = eval_windows(streams[key], seq_len, max_tokens)
        nll, n = 0.0, 0
        for i in range(0, len(win), batch):
            x = torch.from_numpy(win[i:i + batch]).to(device)
            with torch.no_grad():
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
        res[key.split(":", 1)[1].split("/")[0]] = {"tokens": n, "loss": nll / max(n, 1),
                                                   "ppl": math.exp(nll / max(n, 1))}
    model.train()
    return res


# ============================================================== training


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * t))


def balance_loss(router_logits, top_k: int, n_experts: int, groups: int = 1):
    """Switch-style load-balancing loss E * sum_i f_i * P_i, per MoE layer, averaged over layers.

    f_i (share of top-k assignments to expert i) and P_i (mean router probability) are taken
    over each of `groups` equal slices of the tokens (groups = batch size: per sequence) and
    the losses averaged; groups=1 is Qwen3's global-batch balancing: the whole batch's counts,
    so single sequences may specialise as long as the batch as a whole is balanced.
    transformers' own aux loss instead pools all layers' counts into one.
    """
    import torch

    total = 0.0
    for rl in router_logits:
        p = torch.softmax(rl.float(), dim=-1).reshape(groups, -1, n_experts)   # [G, T, E]
        idx = torch.topk(p, top_k, dim=-1).indices                              # [G, T, k]
        f = torch.zeros_like(p[:, 0]).scatter_add_(1, idx.reshape(groups, -1),
                                                   torch.ones_like(idx.reshape(groups, -1), dtype=p.dtype))
        f = f / idx[0].numel()                                                  # [G, E], rows sum to 1
        total = total + n_experts * (f * p.mean(dim=1)).sum(dim=-1).mean()
    return total / len(router_logits)


def post_steps(sync_dir: str, name: str, cap: int) -> None:
    """Models of one comparison agree on the smallest step count any of them can afford:
    each posts its own cap here, then waits for the others' (agreed_steps). It must wait idle:
    a faster model that trained on meanwhile went past the agreed count (a 2026-12-02 run
    reached 485 steps against 342 for the others)."""
    d = Path(sync_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.tmp").write_text(str(cap))
    (d / f"{name}.tmp").rename(d / f"{name}.steps")


def agreed_steps(sync_dir: str, n: int, give_up: bool) -> int | None:
    """The minimum posted cap once all n have posted (or, give_up, of those that have)."""
    caps = [int(p.read_text()) for p in Path(sync_dir).glob("*.steps")]
    return min(caps) if len(caps) >= n or (give_up and caps) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train mlxmoe's reference MoE (HF layout).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", choices=["qwen3_moe", "qwen2_moe"], default="qwen3_moe")
    ap.add_argument("--experts", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=768, help="dense MLP size (unused unless mlp_only_layers)")
    ap.add_argument("--shared-intermediate", type=int, default=256, help="qwen2_moe shared expert size")
    ap.add_argument("--norm-topk-prob", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                    help="default: true for qwen3_moe, false for qwen2_moe (as in the released families; "
                         "mlx-lm's qwen2_moe does not renormalise the top-k weights)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-position-embeddings", type=int, default=2048)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--aux-loss-coef", type=float, default=0.1)
    ap.add_argument("--balance", choices=["hf", "global"], default="hf",
                    help="hf: transformers' aux loss; global: per-layer global-batch balancing (Qwen3)")
    ap.add_argument("--sync-dir", default=None, help="with --time-budget: agree on one step count with the "
                                                     "other --sync-n models writing to this dir")
    ap.add_argument("--sync-n", type=int, default=1)
    ap.add_argument("--measure-steps", default="20,60", help="steps between which the step time is measured")
    ap.add_argument("--title", default="mlxmoe reference MoE")
    ap.add_argument("--about", default=None, help="the first paragraph of TRAINING.md")
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--domain-alpha", type=float, default=0.8,
                    help="sample domain d with weight tokens_d**alpha")
    ap.add_argument("--chat-frac", type=float, default=0.2, help="share of train docs also added as ChatML")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of training; caps --steps from the measured step time")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-max-tokens", type=int, default=300_000, help="per domain, final eval")
    ap.add_argument("--experts-impl", choices=["auto", "fast", "eager", "grouped_mm"], default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--corpus", default=str(REPO / "corpus"))
    ap.add_argument("--out", default=str(REPO / "out" / "reference-moe"))
    ap.add_argument("--max-shard-size", default="15MB")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args(argv)
    if args.norm_topk_prob is None:
        args.norm_topk_prob = args.arch == "qwen3_moe"
    if args.hidden % args.heads:
        raise SystemExit("--hidden must be a multiple of --heads")

    t_start = time.time()
    prep = prepare(args)
    if args.prepare_only:
        return 0

    import torch
    import transformers

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta, streams = prep["meta"], prep["streams"]
    domains = sorted(meta["domains"])
    vocab = int(meta["vocab_size"])
    special_ids = meta["special_ids"]
    cfg = build_config(args, vocab, special_ids)
    impl = args.experts_impl
    if impl == "auto":
        impl = "fast" if device.type == "cuda" and _grouped_mm_fn() is not None else "eager"
    hf_impl = "grouped_mm" if impl == "grouped_mm" else "eager"
    try:
        model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=hf_impl)
    except TypeError:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - n_expert + n_expert * args.top_k // args.experts - model.model.embed_tokens.weight.numel()
    log(f"[model] {args.arch} params={n_params/1e6:.2f}M experts={n_expert/1e6:.2f}M "
        f"active(non-embedding)={n_active/1e6:.2f}M device={device}")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    impl_desc = patch_experts(model, impl)
    if impl == "fast":  # check the fast path against transformers' eager maths once
        x = torch.from_numpy(eval_windows(streams[f"{domains[0]}/heldout"], 128, 4 * 128)).to(device)
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            a = model(input_ids=x).logits.float()
            unpatch_experts(model)
            b = model(input_ids=x).logits.float()
        rel = float((a - b).norm() / b.norm())
        log(f"[model] fast experts vs eager: rel diff {rel:.2e}")
        if not rel < 2e-2:
            log("[model] fast path disagrees with eager -> using eager")
            impl_desc = "eager (fast path rejected)"
        else:
            patch_experts(model, "fast")
    log(f"[model] experts implementation: {impl_desc}")

    # ---- data sampler
    tr_tokens = {d: len(streams[f"{d}/train"]) for d in domains}
    w = np.array([tr_tokens[d] ** args.domain_alpha for d in domains], dtype=np.float64)
    w /= w.sum()
    rng = np.random.default_rng(args.seed)
    L = args.seq_len

    def sample_batch(bsz):
        ds = rng.choice(len(domains), size=bsz, p=w)
        rows = []
        for di in ds:
            s = streams[f"{domains[di]}/train"]
            o = int(rng.integers(0, len(s) - L))
            rows.append(s[o:o + L])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    # small fixed validation set (first windows of each held-out stream) for the curve
    val = {d: eval_windows(streams[f"{d}/heldout"], L, 8 * L) for d in domains}

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed_tokens" not in n else no_decay).append(p)
    opt_kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kw)

    total_steps = args.steps
    m0, m1 = (int(v) for v in args.measure_steps.split(","))
    stopped_early = False
    model.train()
    history, curve = [], []
    t_train = time.time()
    t_measure = None
    step = 0
    ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
    load_acc = torch.zeros(args.layers, args.experts, device=device)
    last_ce = float("nan")
    while step < total_steps:
        lr = lr_at(step, total_steps, args.warmup, args.lr, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(args.batch).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
            loss, aux = out.loss, out.aux_loss
            if args.balance == "global":
                aux = balance_loss(out.router_logits, args.top_k, args.experts)
                loss = loss + args.aux_loss_coef * aux
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # training-batch expert load (top-k assignment counts per layer)
            for li, rl in enumerate(out.router_logits):
                ti = torch.topk(rl.detach(), args.top_k, dim=-1).indices.reshape(-1)
                ti = ti.to(torch.int32 if ti.is_cuda else torch.float32)
                load_acc[li] += torch.histc(ti, bins=args.experts, min=0, max=args.experts - 1).float()
        aux = aux.detach()
        ce_acc = ce_acc + (loss.detach() - args.aux_loss_coef * aux)
        aux_acc = aux_acc + aux
        n_acc += 1
        step += 1
        if step == m0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_measure = time.time()
        if args.time_budget and step == m1 and t_measure is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t_measure) / (m1 - m0)
            budget_left = args.time_budget - (time.time() - t_train)
            cap = min(total_steps, step + int(budget_left / per))
            log(f"[train] {per*1000:.1f} ms/step: {cap} of {total_steps} steps fit the time budget")
            total_steps = max(cap, step)
            if args.sync_dir:
                post_steps(args.sync_dir, Path(args.out).name, cap)
                t_posted, agreed = time.time(), None
                while agreed is None:  # idle until every model has posted (or 120 s): none trains past the others
                    agreed = agreed_steps(args.sync_dir, args.sync_n, give_up=time.time() - t_posted > 120)
                    time.sleep(0 if agreed is not None else 0.5)
                total_steps = max(agreed, step)
                log(f"[train] agreed with {args.sync_dir}: {total_steps} steps")
        if args.time_budget and time.time() - t_train > 1.2 * args.time_budget + 30:
            log(f"[train] past 1.2x the time budget: stopping at step {step} of {total_steps}")
            stopped_early = True
            break
        if step % 50 == 0 or step == total_steps:
            ce = float(ce_acc) / n_acc
            last_ce = ce
            rec = {"step": step, "lr": lr, "ce": ce, "aux": float(aux_acc) / n_acc, "grad_norm": float(gnorm),
                   "elapsed_s": round(time.time() - t_train, 1)}
            frac = (load_acc / load_acc.sum(dim=1, keepdim=True)).cpu().numpy()
            rec["load_min"] = round(float(frac.min()), 5)
            rec["load_max"] = round(float(frac.max()), 5)
            rec["cold_experts"] = int((frac < 0.1 / args.experts).sum())  # (layer, expert) pairs < 10% of uniform
            history.append(rec)
            log(f"[train] step {step:5d}/{total_steps} ce {ce:.4f} aux {rec['aux']:.4f} lr {lr:.2e} "
                f"gn {rec['grad_norm']:.2f} load {rec['load_min']:.4f}-{rec['load_max']:.4f} "
                f"cold {rec['cold_experts']} t {rec['elapsed_s']:.0f}s")
            ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
            load_acc.zero_()
        if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
            r = evaluate(model, {**streams, **{f"{d}/heldout": val[d].reshape(-1) for d in domains}}, domains,
                         L, 8 * L, 8, device, autocast_dtype, args.top_k, args.experts, args.layers, vocab,
                         routing=False)
            pt = {"step": step, **{d: round(r["domains"][d]["loss"], 4) for d in domains}}
            curve.append(pt)
            log(f"[val] step {step}: " + " ".join(f"{d}={pt[d]:.3f}" for d in domains))
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_wall = time.time() - t_train
    tokens_seen = step * args.batch * L
    log(f"[train] done: {step} steps, {tokens_seen/1e6:.1f}M tokens, {train_wall:.0f}s")

    # ---- save (bf16, released-checkpoint layout)
    out_dir = Path(args.out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    unpatch_experts(model)
    model.config.output_router_logits = False
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        pad_token_id=special_ids["<|endoftext|>"], do_sample=False)
    model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size=args.max_shard_size)
    for f in out_dir.glob("*.safetensors"):
        os.chmod(f, 0o644)
    cpath = out_dir / "config.json"
    c = json.loads(cpath.read_text())
    c["num_experts"] = args.experts
    c["rope_theta"] = args.rope_theta
    c["output_router_logits"] = False
    c["router_aux_loss_coef"] = args.aux_loss_coef
    c.setdefault("torch_dtype", "bfloat16")
    cpath.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    for f in (prep["dir"] / "tokenizer").iterdir():
        shutil.copy(f, out_dir / f.name)
    log(f"[save] {out_dir}: " + ", ".join(sorted(p.name for p in out_dir.iterdir())))

    # ---- reload what was saved and evaluate it (fp32 maths on the bf16 weights)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_eval = time.time()
    try:
        saved = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                                  experts_implementation="eager")
    except TypeError:
        saved = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    saved.to(device)
    final = evaluate(saved, streams, domains, L, args.eval_max_tokens, 16 if device.type == "cuda" else 2,
                     device, None, args.top_k, args.experts, args.layers, vocab, routing=True)
    final["unseen"] = unseen_losses(saved, streams, L, args.eval_max_tokens, 16 if device.type == "cuda" else 2,
                                    device)
    eval_wall = time.time() - t_eval
    for d in domains:
        r = final["domains"][d]
        log(f"[eval] {d:11s} loss {r['loss']:.4f} ppl {r['ppl']:8.2f} | unigram {r['unigram_loss']:.4f} "
            f"({r['tokens']} tok)")
    for ly in final["layers"]:
        log(f"[route] layer {ly['layer']}: load min {ly['load_min']:.4f} max {ly['load_max']:.4f} "
            f"(uniform {ly['uniform']:.4f}) top-k mass {ly['topk_mass_mean']:.3f} "
            f"(uniform router {ly['topk_mass_uniform_router']:.3f})")

    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    report = {
        "title": args.title, "about": args.about,
        "model": {"arch": args.arch, "config": c, "params": n_params, "expert_params": n_expert,
                  "active_params_non_embedding": n_active},
        "training": {
            "steps": step, "batch": args.batch, "seq_len": L, "tokens_seen": tokens_seen,
            "lr": args.lr, "min_lr_frac": args.min_lr_frac, "warmup": args.warmup,
            "weight_decay": args.weight_decay, "aux_loss_coef": args.aux_loss_coef,
            "optimizer": "AdamW(0.9,0.95)", "precision": "bf16 autocast, fp32 master weights" if autocast_dtype
            else "fp32", "seed": args.seed, "domain_alpha": args.domain_alpha,
            "domain_sampling_weights": {d: round(float(x), 4) for d, x in zip(domains, w)},
            "chat_frac": args.chat_frac, "time_budget_s": args.time_budget,
            "wall_time_s": round(train_wall, 1), "eval_wall_time_s": round(eval_wall, 1),
            "total_wall_time_s": round(time.time() - t_start, 1),
            "final_train_ce": last_ce, "experts_implementation": impl_desc,
            "balance": args.balance, "stopped_early": stopped_early,
            "history": history, "val_curve": curve,
        },
        "environment": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "corpus": {"manifest_total_bytes": prep["manifest"]["total_bytes"], "cache_key": meta["key"],
                   "domains": meta["domains"]},
        "eval": {"split": "heldout", "seq_len": L, "max_tokens_per_domain": args.eval_max_tokens,
                 "weights": "saved bf16 weights, fp32 compute",
                 "unigram": "per-domain unigram fitted on that domain's train tokens (add-0.5); "
                            "global_unigram: fitted on all train tokens",
                 **final},
        "files": files,
        "command": "python3 tools/train_reference_moe.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "TRAINING.md").write_text(render_md(report))
    log(f"[done] total {time.time()-t_start:.0f}s")
    return 0


def render_md(r: dict) -> str:
    m, t, e, env = r["model"], r["training"], r["eval"], r["environment"]
    c = m["config"]
    lines = [
        f"# {r.get('title', 'mlxmoe reference MoE')}",
        "",
        r.get("about") or (
            "A small Mixture-of-Experts language model trained from scratch by "
            "`tools/train_reference_moe.py` on the corpus of `tools/build_corpus.py` "
            "(Python stdlib code; English, German, Spanish and Italian fortune-cookie prose; "
            "iso-codes records as JSON/CSV). It exists so that tests, benchmarks and the offline demo "
            "run a *real* trained MoE in the exact Hugging Face layout of a released checkpoint. "
            "It is not a useful assistant."),
        "",
        "## Model",
        "",
        f"- architecture: `{c['model_type']}` ({c['architectures'][0]}), {c['num_hidden_layers']} layers, "
        f"hidden {c['hidden_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads"
        + (f" (head_dim {c['head_dim']})" if "head_dim" in c else ""),
        f"- MoE: {c['num_experts']} routed experts, top-{c['num_experts_per_tok']}, moe_intermediate "
        f"{c['moe_intermediate_size']}, norm_topk_prob {str(c['norm_topk_prob']).lower()}"
        + (f", shared expert {c['shared_expert_intermediate_size']}" if "shared_expert_intermediate_size" in c else ""),
        f"- vocab {c['vocab_size']} (byte-level BPE + `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), "
        f"untied embeddings, max_position_embeddings {c['max_position_embeddings']}, rope_theta {c['rope_theta']:g}",
        f"- parameters: {m['params']/1e6:.2f}M total, {m['expert_params']/1e6:.2f}M in routed experts, "
        f"{m['active_params_non_embedding']/1e6:.2f}M active per token (non-embedding)",
        "- weights: bfloat16, sharded safetensors + `model.safetensors.index.json`; chat template: ChatML",
        "",
        "## Training",
        "",
        f"- {t['steps']} steps x {t['batch']} x {t['seq_len']} tokens = {t['tokens_seen']/1e6:.1f}M tokens seen; "
        f"AdamW lr {t['lr']:g} (warmup {t['warmup']}, cosine to {t['min_lr_frac']:g}x), wd {t['weight_decay']}, "
        f"{t['precision']}",
        f"- load-balancing aux loss coefficient {t['aux_loss_coef']} (output_router_logits during training only)"
        + ("; global-batch balancing per layer (Qwen3): expert counts of the whole batch"
           if t.get("balance") == "global" else ""),
        f"- {t['chat_frac']:.0%} of training documents also appear as ChatML user/assistant exchanges",
        f"- domain sampling weights: " + ", ".join(f"{k} {v:.3f}" for k, v in t["domain_sampling_weights"].items()),
        f"- wall time {t['wall_time_s']:.0f}s training on {env['device']} "
        f"(torch {env['torch']}, transformers {env['transformers']}); final train CE {t['final_train_ce']:.3f}",
        f"- command: `{r['command']}`",
        "",
        "## Held-out evaluation",
        "",
        f"Next-token loss (nats/token) on the held-out split (every 20th document), windows of {e['seq_len']} "
        f"tokens, up to {e['max_tokens_per_domain']} tokens per domain, {e['weights']}. "
        "Unigram: a per-domain unigram model fitted on that domain's training tokens.",
        "",
        "| domain | tokens | loss | perplexity | unigram loss | unigram ppl | global unigram loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d, v in e["domains"].items():
        lines.append(f"| {d} | {v['tokens']} | {v['loss']:.3f} | {v['ppl']:.2f} | {v['unigram_loss']:.3f} | "
                     f"{v['unigram_ppl']:.1f} | {v['global_unigram_loss']:.3f} |")
    lines += [
        "",
        "## Expert load (held-out tokens, all domains)",
        "",
        "Fraction of top-k assignments per expert (uniform = 1/n_experts), over all held-out tokens "
        "(token-weighted, so code-heavy) and domain-balanced (mean of the per-domain loads); "
        "top-k mass = mean router "
        "probability of the chosen experts (a token-independent uniform router gives k/n). "
        "TV = total-variation distance between a domain's expert load and the all-domain load "
        "(0 for a router that ignores the input).",
        "",
        "| layer | min load | max load | balanced min | balanced max | uniform | CV (balanced) | top-k mass | max TV (domain) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for ly in e["layers"]:
        pdm = ly["per_domain"]
        best = max(pdm, key=lambda d: pdm[d]["tv_vs_all"]) if pdm else None
        tvs = f"{pdm[best]['tv_vs_all']:.3f} ({best})" if best else "-"
        lines.append(f"| {ly['layer']} | {ly['load_min']:.4f} | {ly['load_max']:.4f} | "
                     f"{ly['balanced_load_min']:.4f} | {ly['balanced_load_max']:.4f} | {ly['uniform']:.4f} | "
                     f"{ly['balanced_load_cv']:.2f} | {ly['topk_mass_mean']:.3f} (uniform {ly['topk_mass_uniform_router']:.3f}) "
                     f"| {tvs} |")
    if e.get("unseen"):
        lines += ["", "## Unseen kinds of text", "",
                  "Next-token loss on kinds of text that no training domain and no suite contains.", "",
                  "| kind | tokens | loss | perplexity |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['tokens']} | {v['loss']:.3f} | {v['ppl']:.2f} |" for k, v in e["unseen"].items()]
    if t.get("val_curve"):
        lines += ["", "## Validation curve (first 8 held-out windows per domain)", "",
                  "| step | " + " | ".join(k for k in t["val_curve"][0] if k != "step") + " |",
                  "| ---: |" + " ---: |" * (len(t["val_curve"][0]) - 1)]
        for pt in t["val_curve"]:
            lines.append(f"| {pt['step']} | " + " | ".join(f"{v:.3f}" for k, v in pt.items() if k != "step") + " |")
    lines += ["", "Full numbers: `training_report.json`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
