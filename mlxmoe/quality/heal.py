"""Healing behind `mlxmoe calibrate --heal`: per group, train a small set of
the masked model's parameters to bring it back towards the full model.

The full model is the teacher. Its next-token distribution on the calibration
suite is computed once and cached as its top-`teacher_k` log-probabilities
plus the mass of the rest (one "tail" bucket): the full [T, V] table does not
fit for real vocabularies (150k), and KL over the top tokens + tail is the KL
between the two distributions coarsened the same way (a lower bound of the full
KL that keeps every token the teacher gives real mass to).

The student is the same full model masked to the group's eligible set
(`set_eligible`: exactly what the node computes). Trainable sets (TRAINABLE):
  router   the router rows of the eligible experts, every MoE layer
  norms    every RMSNorm weight (attention, MoE input, q/k norms, final)
  lora     rank-r LoRA on attention q/k/v/o, merged into the weights at load
Each group trains on the passages the router would place on it (first MoE
layer, prompt tokens; all passages when too few are): a node serves those, and
capacity spent on the others was measured to cost unseen text (docs/QUALITY.md).
Training minimises the coarse KL with Adam, one passage per step, and stops
early when the KL on a held-out slice of the suite (every `heldout_every`-th
passage of each domain) has not improved for `patience` checks; the best
checkpoint is kept. Parameters are plain name -> array dicts (model/heal.py
applies them), written into the bundle by calibrate.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxmoe.bundle.manifest import Manifest, heal_file
from mlxmoe.bundle.writer import write_bundle
from mlxmoe.errors import MlxMoeError
from mlxmoe.model import heal as mh

TRAINABLE = ("router", "norms", "lora")
DEFAULT_TRAINABLE = ("router", "norms")  # LoRA on attention overfits the suite: docs/QUALITY.md, Healing
# Adam step per kind, relative to HealConfig.lr: measured on the reference model
# (docs/QUALITY.md, Healing): router rows and norms diverge at the LoRA's rate
LR_SCALE = {"router": 0.1, "norms": 0.3, "lora": 1.0}


@dataclass
class HealConfig:
    trainable: tuple = DEFAULT_TRAINABLE
    rank: int = 8
    lr: float = 1e-3
    max_steps: int = 300
    check_every: int = 40
    patience: int = 2
    placed: bool = True  # train each group on the passages placement sends to it (module doc)
    min_placed: int = 16  # ... unless fewer than this are: then on every passage
    prompt_tokens: int = 32  # what placement sees of a passage
    warmup: int = 40  # steps of linear learning-rate warmup: a zero-initialised LoRA otherwise overshoots
    heldout_every: int = 8  # every 8th passage per domain is held out for early stopping
    teacher_k: int = 64
    max_tokens: int = 256  # passages are cut to this many tokens
    seed: int = 0


def parse_trainable(text: str) -> tuple:
    """'router,norms' -> ("router", "norms"); unknown names are an error naming them."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in TRAINABLE]
    if bad or not names:
        raise MlxMoeError(f"--heal-params {text!r}: choose one or more of {', '.join(TRAINABLE)} (comma-separated)")
    return tuple(x for x in TRAINABLE if x in names)


# ------------------------------------------------------------------ data

def split_heldout(items: list, every: int) -> tuple[list, list]:
    """(train, held): passages 1, 1 + every, 1 + 2*every, ... of each domain
    are held out (one per domain from 2 passages on), the rest trains."""
    train, held, seen = [], [], {}
    for dom, ids in items:
        i = seen[dom] = seen.get(dom, -1) + 1
        (held if i % every == 1 else train).append((dom, ids))
    if not train or not held:
        raise MlxMoeError(f"healing needs at least 2 passages per domain in the suite (train + held-out), got {len(items)}")
    return train, held


def teacher(loaded, items: list, k: int) -> list[tuple]:
    """Per passage: (ids, top-k token ids [T, k], their log-probs [T, k],
    log of the rest's mass [T]) of the full model."""
    from mlxmoe.quality.metrics import logp_of

    loaded.set_eligible(None)
    out = []
    for _, ids in items:
        lp = logp_of(loaded, ids)
        top = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
        tl = mx.take_along_axis(lp, top, axis=-1)
        tail = mx.log(mx.maximum(1.0 - mx.exp(tl).sum(-1), 1e-12))
        mx.eval(top, tl, tail)
        out.append((ids, top, tl, tail))
    return out


def coarse_kl(top, tl, tail, logits) -> mx.array:
    """Mean over positions of KL(teacher || student) over the teacher's top-k
    tokens plus one bucket for the rest (module doc)."""
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sl = mx.take_along_axis(lp, top, axis=-1)
    stail = mx.log(mx.maximum(1.0 - mx.exp(sl).sum(-1), 1e-12))
    kl = (mx.exp(tl) * (tl - sl)).sum(-1) + mx.exp(tail) * (tail - stail)
    return kl.mean()


# ------------------------------------------------------------------ training

def should_stop(history: list[float], patience: int) -> bool:
    """Early stopping: the last `patience` checks are all no better than the
    best before them."""
    if len(history) <= patience:
        return False
    return min(history[-patience:]) >= min(history[:-patience])


def warmup(lr: float, steps: int):
    """Linear warmup from 0 to `lr` over `steps`, then `lr`."""
    if steps <= 0:
        return lr
    return optim.join_schedules([optim.linear_schedule(0.0, lr, steps), lambda _: lr], [steps])


def heal_group(loaded, eligible: dict, data: list, held: list, cfg: HealConfig, advance=lambda n: None) -> tuple[dict, dict]:
    """Train the healed parameters of one node set (`eligible`: layer -> ids) on
    the full model. Returns (params as saved: model/heal.py's names, info)."""
    model = loaded.model
    base = dict(tree_flatten(model.parameters()))
    params = mh.initial(loaded, cfg.trainable, cfg.rank, cfg.seed, eligible)
    loaded.set_eligible(eligible)

    def loss(p, ids, top, tl, tail):
        with mh.applied(loaded, base, p, eligible):
            return coarse_kl(top, tl, tail, model(mx.array([ids]))[0].astype(mx.float32))

    def held_kl(p) -> float:
        return float(np.mean([loss(p, *h).item() for h in held]))

    grad = mx.value_and_grad(loss)
    kinds = {k: mh.kind_of(loaded, k, eligible) for k in params}
    opts = {kind: optim.Adam(learning_rate=warmup(cfg.lr * LR_SCALE[kind], cfg.warmup)) for kind in set(kinds.values())}
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(data)) for _ in range(-(-cfg.max_steps // len(data)))])[: cfg.max_steps]
    t0 = time.time()
    hist, best, best_at, tokens = [held_kl(params)], params, 0, 0

    def check(step: int) -> bool:
        nonlocal best, best_at
        hist.append(held_kl(params))
        if hist[-1] < min(hist[:-1]):
            best, best_at = {k: mx.array(v) for k, v in params.items()}, step
        return should_stop(hist, cfg.patience)

    step = 0
    try:
        for step, i in enumerate(order, 1):
            _, g = grad(params, *data[i])
            for kind, opt in opts.items():
                part = {k: v for k, v in params.items() if kinds[k] == kind}
                opt.update(part, {k: g[k] for k in part})  # a plain dict: updated in place
                params.update(part)
            mx.eval(params, [o.state for o in opts.values()])
            tokens += len(data[i][0])
            advance(len(data[i][0]))
            if (step % cfg.check_every == 0 or step == cfg.max_steps) and check(step) and step > 2 * cfg.warmup:
                break
    finally:
        loaded.set_eligible(None)
    saved = best if best_at else {}  # no check improved: nothing to apply
    info = {"trainable": list(cfg.trainable), "rank": cfg.rank if "lora" in cfg.trainable else None,
            "steps": step, "best_step": best_at, "train_tokens": tokens, "seconds": round(time.time() - t0, 1),
            "heldout_kl_before": round(hist[0], 5), "heldout_kl_after": round(min(hist), 5),
            "heldout_kl_history": [round(h, 5) for h in hist],
            "params": int(sum(v.size for v in saved.values())), "bytes": int(sum(v.nbytes for v in saved.values()))}
    return saved, info


def prepare(loaded, tokenizer, passages, cfg: HealConfig) -> tuple[list, list, list, list]:
    """Teacher caches of the train and held-out slices of a suite, and the
    group placement picks for each passage."""
    from mlxmoe.quality.suites import tokenize

    items = [(d, ids[: cfg.max_tokens]) for d, ids in tokenize(tokenizer, passages) if len(ids) >= 4]
    train, held = split_heldout(items, cfg.heldout_every)
    return (teacher(loaded, train, cfg.teacher_k), teacher(loaded, held, cfg.teacher_k),
            placements(loaded, train, cfg.prompt_tokens), placements(loaded, held, cfg.prompt_tokens))


def placements(loaded, items: list, prompt_tokens: int) -> list[int]:
    """The group the router places each passage on (its first tokens, first MoE layer)."""
    from mlxmoe.model.moe import GateRecorder
    from mlxmoe.model.placement import score_groups

    m, first = loaded.manifest, loaded.manifest.moe_layers[0]
    out = []
    for _, ids in items:
        with GateRecorder(loaded.gates, stop_at=first) as rec:
            loaded.model(mx.array([ids[:prompt_tokens]]))
        out.append(score_groups(m, {first: rec.by_layer()[first][0]}).best)
    return out


def for_group(data: list, placed: list[int], g: int, minimum: int) -> list:
    """The passages placed on group g, or all of them when fewer than `minimum` are."""
    mine = [d for d, p in zip(data, placed) if p == g]
    return mine if len(mine) >= minimum else data


# ------------------------------------------------------------------ driver

def heal_bundle(bundle, suites=None, cfg: HealConfig | None = None, out=None, progress_mode: str = "quiet") -> dict:
    """Heal every masked group of `bundle` and write the result (in place, or
    to `out`) through bundle/writer.py: heal-group-XX.safetensors per group,
    provenance under calibration["heal"]. A group with every expert eligible
    is skipped (it is the full model)."""
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.progress import progress
    from mlxmoe.quality.suites import load_suites

    cfg = cfg or HealConfig()
    bundle = Path(bundle)
    out = Path(out) if out else bundle
    names, passages = load_suites(suites, "calibration")
    loaded = load_bundle(bundle)
    m = loaded.manifest
    if "lora" in cfg.trainable and any(isinstance(mod, nn.QuantizedLinear) for path, mod in loaded.model.named_modules()
                                       if ".self_attn." in f".{path}."):
        raise MlxMoeError(f"--heal-params lora: {bundle}'s attention is quantized; LoRA merges into unquantized "
                          "weights only (split with --trunk-bits 16, or heal router,norms)")
    t0 = time.time()
    train, held, p_train, p_held = prepare(loaded, load_tokenizer(bundle), passages, cfg)
    groups = [g for g in range(m.n_groups) if any(len(m.eligible(g, l)) < m.n_experts for l in m.moe_layers)]
    per_group, tensors = {}, {}
    with progress(cfg.max_steps * len(groups) * int(np.mean([len(t[0]) for t in train])), "heal", progress_mode,
                  unit="items") as p:
        for g in groups:
            elig = {l: m.eligible(g, l) for l in m.moe_layers}
            data, check = train, held
            if cfg.placed:
                data = for_group(train, p_train, g, cfg.min_placed)
                check = for_group(held, p_held, g, max(1, cfg.min_placed // cfg.heldout_every))
            tensors[g], per_group[str(g)] = heal_group(loaded, elig, data, check, cfg, p.advance)
            per_group[str(g)].update(train_passages=len(data), heldout_passages=len(check))
    del loaded
    info = {"suites": names, "suite_sha256": suite_sha256(passages), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "teacher": f"top-{cfg.teacher_k} log-probs + tail mass", "train_passages": len(train),
            "heldout_passages": len(held), "config": asdict(cfg) | {"trainable": list(cfg.trainable)},
            "seconds": round(time.time() - t0, 1), "groups": per_group}
    new = write_healed(bundle, out, {g: t for g, t in tensors.items() if t}, info)
    return {"out": str(out), "manifest_hash": new.hash, "heal": info}


def suite_sha256(passages) -> str:
    h = hashlib.sha256()
    for p in passages:
        h.update(json.dumps([p.domain, p.text]).encode() + b"\n")
    return h.hexdigest()


def write_healed(bundle: Path, out: Path, tensors: dict, info: dict) -> Manifest:
    """The bundle's files (hard-linked, hashes kept) + one healed-parameter
    file per group; earlier healed files are replaced."""
    m = Manifest.load(bundle)

    def fill(tmp: Path) -> dict:
        files = {}
        for name, meta in m.files.items():
            if meta["role"] != "heal":
                _link(bundle / name, tmp / name)
                files[name] = dict(meta)
        for g, t in tensors.items():
            mx.save_safetensors(str(tmp / heal_file(g)), t, metadata={"format": "mlxmoe.heal"})
            files[heal_file(g)] = {"role": "heal", "group": g}
        return files

    def manifest(files: dict) -> Manifest:
        return Manifest(model=m.model, moe=m.moe, n_groups=m.n_groups, grouping=m.grouping, overlay=m.overlay,
                        quantization=m.quantization, files=files, calibration={**(m.calibration or {}), "heal": info},
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    return write_bundle(out, fill, manifest)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
