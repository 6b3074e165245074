"""`mlxmoe run`: one node, no network."""

from __future__ import annotations

import json
import sys

import click

from mlxmoe.commands.options import KV_BITS, GROUP_SIZES, clean_errors


def check_group(bundle: str, group) -> None:
    """--group against the bundle's manifest, before MLX or any thread starts
    (an error raised with MLX's threads running could end in an abort)."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.errors import MlxMoeError

    if group in ("auto", "all"):
        return
    try:
        g = int(group)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{group!r}: expected a group number, 'auto' or 'all'", param_hint="--group") from None
    try:
        n = Manifest.load(bundle).n_groups
    except MlxMoeError as e:
        raise click.ClickException(str(e)) from None
    if not 0 <= g < n:
        raise click.BadParameter(f"{g}: this bundle has groups 0..{n - 1}", param_hint="--group")


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
@click.option("--kv-bits", type=click.Choice(KV_BITS), help="KV-cache bits (default: the bundle's).")
@click.option("--kv-group-size", type=click.Choice(GROUP_SIZES), help="KV quantization group size (default: 64, or 32 for small heads).")
@click.option("--json", "as_json", is_flag=True, help="Print tokens with log-probabilities and timings as JSON.")
def run_cmd(bundle, group, prompt, system, raw, max_tokens, temp, top_p, seed, stop, kv_bits, kv_group_size, as_json):
    """Load one group of BUNDLE (trunk + group + overlay) and generate.

    Routing at every MoE layer is masked to the group's experts, exactly as a
    node in a cluster would run. Example:

    \b
        mlxmoe run bundles/ref --group auto -p "Write a haiku about rivers"
    """
    from mlxmoe.params import GenParams
    from mlxmoe.node.local import generate_local

    def show(ev):
        if not as_json:
            click.echo(ev.text, nl=False)
            sys.stdout.flush()

    check_group(bundle, group)
    params = GenParams(max_tokens=max_tokens, temperature=temp, top_p=top_p, stop=list(stop), seed=seed)
    stats, events, scores = clean_errors(
        generate_local, bundle, group, prompt, params, system=system, raw=raw,
        kv_bits=int(kv_bits) if kv_bits else None, kv_group_size=int(kv_group_size) if kv_group_size else None,
        on_event=show)
    if as_json:
        click.echo(json.dumps({**stats, "text": "".join(e.text for e in events),
                               "tokens": [{"id": e.token, "text": e.text, "logprob": e.logprob} for e in events]}))
    else:
        click.echo("", err=True)
        for line in summary(stats, scores):
            click.echo(line, err=True)


def summary(stats: dict, scores=None) -> list[str]:
    """The lines after the answer, as mlx-lm's generate prints them (rates the
    run could not measure say why instead of printing None)."""
    g, n = stats["group"], stats["generated_tokens"]
    where = "all experts" if g is None else f"group {g}"
    extra = f", placement margin {scores.margin:.3f}" if scores else ""
    prompt = f"{stats['prompt_tok_s']:.3f} tokens-per-sec" if stats.get("prompt_tok_s") else "n/a"
    if stats.get("decode_tok_s"):
        gen = f"{stats['decode_tok_s']:.3f} tokens-per-sec"
    else:
        gen = "n/a (the answer ended after its first token: no decode step to time)" if n else "n/a"
    lines = ["=" * 10, f"{where}{extra}; time to first token {stats['ttft_s']}s",
             f"Prompt: {stats['prompt_tokens']} tokens, {prompt}", f"Generation: {n} tokens, {gen}"]
    peak, source = stats.get("peak_memory_gb"), stats.get("peak_memory_source")
    if peak is not None:
        lines.append(f"Peak memory: {peak:.3f} GB" + ("" if source == "mlx" else f" ({source}; MLX reports none here)"))
    return lines
