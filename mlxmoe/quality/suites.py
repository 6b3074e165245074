"""Prompt suites: the shipped calibration / held-out text, or the user's
.jsonl / .txt files, loaded as (domain, text) passages and tokenized."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxmoe import ASSETS
from mlxmoe.errors import MlxMoeError

SUITES = ASSETS / "suites"
MAX_TOKENS = 1024  # per passage: longer ones are cut (teacher forcing, one forward each)


@dataclass
class Passage:
    domain: str
    text: str


def load_suite(spec: str, builtin: str = "calibration") -> tuple[str, list[Passage]]:
    """'builtin' (the shipped calibration.jsonl / heldout.jsonl), a .jsonl file
    of {"domain", "text"} lines, or a .txt file (passages split at blank lines,
    domain = file name)."""
    path = SUITES / f"{builtin}.jsonl" if spec == "builtin" else Path(spec)
    name = f"builtin:{builtin}" if spec == "builtin" else str(path)
    if not path.is_file():
        raise MlxMoeError(f"{spec}: suite file not found (give 'builtin', a .jsonl of {{\"domain\", \"text\"}} lines or a .txt file)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        out = [Passage(path.stem, p.strip()) for p in text.split("\n\n") if p.strip()]
    elif path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise MlxMoeError(f"{path}:{i}: not valid JSON: {e}") from None
            if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not r["text"]:
                raise MlxMoeError(f"{path}:{i}: each line needs a non-empty string field 'text' (and optionally 'domain')")
            out.append(Passage(str(r.get("domain", path.stem)), r["text"]))
    else:
        raise MlxMoeError(f"{path}: suite files must be .jsonl or .txt")
    if not out:
        raise MlxMoeError(f"{path}: the suite has no passages")
    return name, out


def load_suites(specs, builtin="calibration") -> tuple[list[str], list[Passage]]:
    names, passages = [], []
    for s in specs or ["builtin"]:
        n, p = load_suite(s, builtin)
        names.append(n)
        passages += p
    return names, passages


def tokenize(tokenizer, passages: list[Passage]) -> list[tuple[str, list[int]]]:
    out = []
    for p in passages:
        ids = tokenizer.encode(p.text)[:MAX_TOKENS]
        if len(ids) >= 2:
            out.append((p.domain, ids))
    return out


REFERENCE = ASSETS / "reference-moe"  # the bundled model the builtin suites were written for


def is_reference_model(model: dict) -> bool:
    """Whether a manifest's "model" field is the bundled reference model: its
    id names it, or its config is the shipped one."""
    if Path(str(model.get("id", ""))).name == REFERENCE.name:
        return True
    try:
        ref = json.loads((REFERENCE / "config.json").read_text())
    except (OSError, ValueError):
        return False
    cfg = model.get("config") or {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_experts", "vocab_size", "intermediate_size")
    return all(cfg.get(k) == ref.get(k) for k in keys)


def builtin_warning(model: dict, option: str) -> str | None:
    """The warning to print when `option` was left at 'builtin' for a model
    the builtin text was not written for (None when it fits)."""
    if is_reference_model(model):
        return None
    return (f"warning: no {option} given: using the builtin suite, a few short English/code/French passages "
            f"written for the bundled reference model, not for {model.get('id', 'this model')}; pass {option} "
            f"FILE (.jsonl of {{\"domain\", \"text\"}} lines or .txt) with text like your users'")
