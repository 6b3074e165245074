"""One node, no network (what `mlxmoe run` does): load one group of a bundle
(or every expert) and generate."""

from __future__ import annotations

import time

from mlxmoe.errors import MlxMoeError
from mlxmoe.node.contract import GenParams


def generate_local(bundle, group: str, prompt: str, params: GenParams, *, system=None, raw=False, kv_bits=None,
                   kv_group_size=None, on_event=lambda ev: None) -> tuple[dict, list, object]:
    """`group` is a number, 'auto' (best placement score for the prompt) or
    'all' (the full model); kv_bits None means the bundle's, 16 unquantized.
    Returns (stats, token events, placement scores or None); `on_event` sees
    each event as it comes."""
    from mlxmoe.node.engine import Node
    from mlxmoe.node.trunk import TrunkFrontend

    scores = None
    if group in ("auto", "all"):
        front = TrunkFrontend.load(bundle)
        tokens = _tokens(front, prompt, system, raw)
        if group == "auto":
            scores = front.score(tokens)
        g = None if group == "all" else scores.best
        del front
    else:
        try:
            g = int(group)
        except ValueError:
            raise MlxMoeError(f"--group {group!r}: expected a group number, 'auto' or 'all'") from None
    kv = "manifest" if kv_bits is None else (None if kv_bits == 16 else int(kv_bits))
    node = Node.load(bundle, g, kv_bits=kv, kv_group_size=kv_group_size)
    tokens = _tokens(node, prompt, system, raw)
    t0 = time.perf_counter()
    events, first = [], None
    for ev in node.generate(None, tokens, params):
        first = first or time.perf_counter()
        events.append(ev)
        on_event(ev)
    t1 = time.perf_counter()
    n = len(events)
    stats = {"group": g, "prompt_tokens": len(tokens), "generated_tokens": n,
             "ttft_s": round(first - t0, 4) if first else None,
             "decode_tok_s": round((n - 1) / (t1 - first), 2) if n > 1 else None,
             "finish_reason": events[-1].finish_reason if events else None,
             "placement": scores.to_dict() if scores else None}
    return stats, events, scores


def _tokens(tok, prompt, system, raw):
    if raw:
        return tok.encode(prompt)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(msgs)
