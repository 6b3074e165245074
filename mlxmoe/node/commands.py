"""`mlxmoe run`: one node, no network."""

from __future__ import annotations

import json
import sys
import time

import click

from mlxmoe.errors import MlxMoeError
from mlxmoe.node.contract import GenParams


@click.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--group", default="auto", show_default=True, help="Expert group to load: a number, 'auto' (best placement score for the prompt) or 'all' (the full model).")
@click.option("--prompt", "-p", required=True, help="The user message (or raw text with --raw).")
@click.option("--system", help="System message.")
@click.option("--raw", is_flag=True, help="Feed the prompt as plain text, without the chat template.")
@click.option("--max-tokens", "-m", default=128, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--kv-bits", type=click.Choice(["4", "8", "16"]), help="KV-cache bits (default: the bundle's).")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), help="KV quantization group size (default: 64, or 32 for small heads).")
@click.option("--kv-start", default=0, show_default=True, help="Quantize the KV cache once it holds this many tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print tokens with log-probabilities and timings as JSON.")
def run_cmd(bundle, group, prompt, system, raw, max_tokens, temp, top_p, seed, stop, kv_bits, kv_group_size, kv_start, as_json):
    """Load one group of BUNDLE (trunk + group + overlay) and generate.

    Routing at every MoE layer is masked to the group's experts, exactly as a
    node in a cluster would run. Example:

        mlxmoe run bundles/ref --group auto -p "Write a haiku about rivers"
    """
    from mlxmoe.node.engine import Node
    from mlxmoe.node.trunk import TrunkFrontend

    try:
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
        kv = "manifest" if kv_bits is None else (None if kv_bits == "16" else int(kv_bits))
        node = Node.load(bundle, g, kv_bits=kv, kv_start=kv_start,
                         kv_group_size=int(kv_group_size) if kv_group_size else None)
        tokens = _tokens(node, prompt, system, raw)
        params = GenParams(max_tokens=max_tokens, temperature=temp, top_p=top_p, stop=list(stop), seed=seed)
        t0 = time.perf_counter()
        events, first = [], None
        for ev in node.generate(None, tokens, params):
            first = first or time.perf_counter()
            events.append(ev)
            if not as_json:
                click.echo(ev.text, nl=False)
                sys.stdout.flush()
        t1 = time.perf_counter()
    except MlxMoeError as e:
        raise click.ClickException(str(e))
    n = len(events)
    stats = {"group": g, "prompt_tokens": len(tokens), "generated_tokens": n,
             "ttft_s": round(first - t0, 4) if first else None,
             "decode_tok_s": round((n - 1) / (t1 - first), 2) if n > 1 else None,
             "finish_reason": events[-1].finish_reason if events else None,
             "placement": scores.to_dict() if scores else None}
    if as_json:
        click.echo(json.dumps({**stats, "text": "".join(e.text for e in events),
                               "tokens": [{"id": e.token, "text": e.text, "logprob": e.logprob} for e in events]}))
    else:
        where = "all experts" if g is None else f"group {g}"
        extra = f", placement margin {scores.margin:.3f}" if scores else ""
        click.echo(f"\n[{where}{extra}; {n} tokens, {stats['decode_tok_s']} tok/s, ttft {stats['ttft_s']}s]", err=True)


def _tokens(tok, prompt, system, raw):
    if raw:
        return tok.encode(prompt)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(msgs)
