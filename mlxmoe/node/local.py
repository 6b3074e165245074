"""One node, no network (what `mlxmoe run` does): load one group of a bundle
(or every expert) and generate."""

from __future__ import annotations

import time

from mlxmoe.errors import MlxMoeError
from mlxmoe.params import GenParams


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
        tokens = _tokens(front, prompt, system, raw, bundle)
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
    tokens = _tokens(node, prompt, system, raw, bundle)
    t0 = time.perf_counter()
    events, first = [], None
    for ev in node.generate(None, tokens, params):
        first = first or time.perf_counter()
        events.append(ev)
        on_event(ev)
    t1 = time.perf_counter()
    n = len(events)
    # As mlx-lm's generate: the first token's time is the prompt's (prefill), the rest is decode.
    # One token (the model ended at once) leaves no decode step to time: the rate is None then.
    stats = {"group": g, "prompt_tokens": len(tokens), "generated_tokens": n,
             "ttft_s": round(first - t0, 4) if first else None,
             "prompt_tok_s": round(len(tokens) / (first - t0), 2) if first and first > t0 else None,
             "decode_tok_s": round((n - 1) / (t1 - first), 2) if n > 1 and t1 > first else None,
             "finish_reason": events[-1].finish_reason if events else None,
             "placement": scores.to_dict() if scores else None, **peak_memory()}
    return stats, events, scores


def peak_memory() -> dict:
    """{"peak_memory_gb", "peak_memory_source"}: MLX's peak allocation, or where MLX
    reports none (0, as on some CPU builds) this process's peak resident set."""
    import mlx.core as mx

    peak = mx.get_peak_memory()
    if peak:
        return {"peak_memory_gb": round(peak / 1e9, 3), "peak_memory_source": "mlx"}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return {"peak_memory_gb": None, "peak_memory_source": None}
    return {"peak_memory_gb": round(rss / 1e9, 3), "peak_memory_source": "process peak RSS"}


def _tokens(tok, prompt, system, raw, bundle):
    if raw:
        return tok.encode(prompt)
    tokenizer = getattr(tok, "tokenizer", None)
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise MlxMoeError(f"{bundle}: this model has no chat template (none in its tokenizer files); "
                          "use --raw to send the prompt as plain text")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(msgs)
