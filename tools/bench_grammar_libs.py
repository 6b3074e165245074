"""Grammar libraries on the CPU: compile time of a JSON-schema grammar (a tool call and
json_object) and per-token mask time over ~200 tokens of a random walk through the grammar,
on the bundled reference model's tokenizer. Writes JSON to stdout (benchmarks/)."""

import json
import platform
import random
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

REF = Path(__file__).parents[1] / "mlxmoe" / "assets" / "reference-moe"
TOOL = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "arguments": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                                   "days": {"type": "integer"}},
                  "required": ["city", "unit"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}
OBJ = {"type": "object"}
STEPS = 200


def walk(mask_fn, advance_fn, vocab, eos, seed=0):
    """Random allowed token each step, mask time per step (seconds)."""
    rng, times = random.Random(seed), []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        allowed = mask_fn()
        times.append(time.perf_counter() - t0)
        ids = [i for i in np.flatnonzero(allowed) if i < vocab]
        non_eos = [i for i in ids if i not in eos]
        if not non_eos:
            break
        advance_fn(int(rng.choice(non_eos)))
    return times


def bits(words, n):
    return np.unpackbits(np.asarray(words).view(np.uint8), bitorder="little")[:n]


def llg(tok, vocab, eos):
    import llguidance, llguidance.hf
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
    t0 = time.perf_counter(); lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=sorted(eos))
    setup = time.perf_counter() - t0
    out = {"tokenizer_setup_s": setup}
    for name, schema in (("tool_call", TOOL), ("json_object", OBJ)):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema))
        m.compute_bitmask()  # first mask included: lazy compilation
        out[f"compile_{name}_s"] = time.perf_counter() - t0
        bm = allocate_token_bitmask(1, vocab)
        def mask():
            fill_next_token_bitmask(m, bm, 0)
            return bits(bm[0], vocab)
        out[f"mask_{name}"] = summary(walk(mask, lambda t: m.consume_token(t), vocab, eos))
    return out


def xgr(tok, vocab, eos):
    import torch
    import xgrammar
    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=sorted(eos))
    comp = xgrammar.GrammarCompiler(info, cache_enabled=False)
    out = {"tokenizer_setup_s": time.perf_counter() - t0}
    for name, schema in (("tool_call", TOOL), ("json_object", OBJ)):
        t0 = time.perf_counter()
        g = comp.compile_json_schema(json.dumps(schema)) if name == "tool_call" else comp.compile_builtin_json_grammar()
        m = xgrammar.GrammarMatcher(g)
        out[f"compile_{name}_s"] = time.perf_counter() - t0
        bm = xgrammar.allocate_token_bitmask(1, vocab)
        def mask():
            m.fill_next_token_bitmask(bm)
            return bits(bm[0].numpy(), vocab)
        out[f"mask_{name}"] = summary(walk(mask, lambda t: m.accept_token(t), vocab, eos))
    return out


def outl(tok, vocab, eos):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    dec = {c: b for b, c in _bytes_to_unicode().items()}
    toks = {}
    for s, i in tok.get_vocab().items():
        if i in eos:
            continue
        try:
            key = bytes(dec[c] for c in s)
        except KeyError:
            key = s.encode()
        toks.setdefault(key, []).append(i)
    v = Vocabulary(min(eos), toks)
    out = {"tokenizer_setup_s": time.perf_counter() - t0}
    for name, schema in (("tool_call", TOOL), ("json_object", OBJ)):
        t0 = time.perf_counter()
        g = Guide(Index(build_regex_from_schema(json.dumps(schema)), v))
        out[f"compile_{name}_s"] = time.perf_counter() - t0
        def mask():
            a = np.zeros(vocab, bool); a[g.get_tokens()] = True
            return a
        out[f"mask_{name}"] = summary(walk(mask, lambda t: g.advance(t), vocab, eos))
    return out


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))


def summary(ts):
    ms = sorted(t * 1e3 for t in ts)
    return {"tokens": len(ms), "median_ms": round(statistics.median(ms), 4), "p90_ms": round(ms[int(0.9 * len(ms))], 4),
            "max_ms": round(ms[-1], 4), "mean_ms": round(statistics.mean(ms), 4)}


def main():
    tok = AutoTokenizer.from_pretrained(str(REF))
    vocab = json.loads((REF / "config.json").read_text())["vocab_size"]
    eos = set(json.loads((REF / "generation_config.json").read_text())["eos_token_id"]) | {tok.eos_token_id}
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
           "2 shared CPU cores (~7 other jobs)", "vocab": vocab, "steps": STEPS,
           "how": "tools/bench_grammar_libs.py: random walk of allowed non-EOS tokens, mask = allowed-token bitmask",
           "libraries": {}}
    for pkg, fn in (("llguidance", llg), ("xgrammar", xgr), ("outlines-core", outl)):
        try:
            res["libraries"][pkg] = {"version": version(pkg), **fn(tok, vocab, eos)}
        except Exception as e:  # noqa: BLE001 - a benchmark records what failed
            res["libraries"][pkg] = {"version": version(pkg), "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
