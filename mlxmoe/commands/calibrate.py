"""`mlxmoe calibrate`: gate statistics -> overlay (and grouping) in a bundle."""

from __future__ import annotations

import json

import click

from mlxmoe.commands.options import clean_errors, parse_size
from mlxmoe.quality import grouping as gr
from mlxmoe.quality.heal import DEFAULT_TRAINABLE, TRAINABLE, HealConfig


def parse_budget(text: str | None) -> tuple | None:
    """'1.5x' -> ("ratio", 1.5); '2GB' -> ("bytes", 2e9) (options.parse_size)."""
    if text is None:
        return None
    t = text.strip().lower()
    if t.endswith("x"):
        try:
            r = float(t[:-1])
        except ValueError:
            r = 0.0
        if not r > 0:
            raise click.BadParameter(f"{text!r}: a ratio is a positive number and x, e.g. 1.5x", param_hint="--set-budget")
        return ("ratio", r)
    return ("bytes", parse_size(text, "--set-budget"))


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--suite", "suites", multiple=True, help="Prompt suite: 'builtin' (default), a .jsonl of {domain, text} lines, or a .txt file. Repeatable.")
@click.option("--overlay-per-layer", type=int, help="Overlay experts per MoE layer (replicated on every node). Default: only the super experts found.")
@click.option("--overlay-bytes", help="Overlay budget per node, e.g. 2GB (sets experts per layer).")
@click.option("--overlay-rule", type=click.Choice(gr.OVERLAY_RULES), default="mass", show_default=True,
              help="mass: experts with the most router probability; breadth: experts every domain uses.")
@click.option("--grouping", "strategy", type=click.Choice(gr.STRATEGIES + gr.SET_STRATEGIES),
              help="Also regroup the experts (default: keep the bundle's grouping). domain-sets: overlapping "
                   "per-node sets by domain (the best measured on the reference model, docs/QUALITY.md).")
@click.option("--set-size", type=int, help="domain-sets: experts per node per layer (default: 1.5x a plain 1/N share).")
@click.option("--set-budget", help="domain-sets: memory per node instead of --set-size: bytes for the node's weights "
              "(trunk + overlay + its set, e.g. 2GB) or a ratio of a plain node's (trunk + 1/N of the experts, e.g. 1.5x).")
@click.option("--budgets", help="One eligible set per node, sized to each node's memory and laid out by measurement: "
              "multiples of a plain share (1x,1.5x,3x) or each Mac's memory (24GB,64GB,192GB; KV at --context "
              "and OS headroom taken off, as `plan` counts). A budget that holds every expert serves the exact model.")
@click.option("--context", type=int, default=32768, show_default=True,
              help="--budgets in bytes: the context each node keeps KV for.")
@click.option("--groups", "n_groups", type=int, help="Number of groups when regrouping (default: the bundle's).")
@click.option("--source", help="Re-split from this checkpoint instead of rewriting the bundle's own expert files.")
@click.option("--out", type=click.Path(file_okay=False), help="Write the calibrated bundle here (default: in place).")
@click.option("--no-super-check", is_flag=True, help="Skip the super-expert removal test.")
@click.option("--heal", is_flag=True, help="Heal every masked group: train a few of its parameters to bring the node "
              "towards the full model on the suite (after any regrouping; docs/QUALITY.md, Healing).")
@click.option("--heal-params", default=",".join(DEFAULT_TRAINABLE), show_default=True,
              help=f"--heal: what each group trains, comma list of {', '.join(TRAINABLE)}.")
@click.option("--heal-steps", type=click.IntRange(1), default=HealConfig.max_steps, show_default=True,
              help="--heal: at most this many passages per group (early stopping on a held-out slice may end sooner).")
@click.option("--heal-lr", type=click.FloatRange(0, min_open=True), default=HealConfig.lr, show_default=True,
              help="--heal: Adam learning rate.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def calibrate_cmd(bundle, suites, overlay_per_layer, overlay_bytes, overlay_rule, strategy, set_size, set_budget,
                  budgets, context, n_groups, source, out, no_super_check, heal, heal_params, heal_steps, heal_lr,
                  as_json):
    """Measure gate statistics on a prompt suite and write an overlay (and,
    with --grouping, a grouping) into BUNDLE.

    \b
    Examples:
      mlxmoe calibrate bundles/qwen3-30b --budgets 24GB,64GB,192GB   # the layout for your Macs
      mlxmoe calibrate bundles/qwen3-30b --overlay-per-layer 8 --grouping coactivation
    """
    if overlay_per_layer is not None and overlay_bytes is not None:
        raise click.UsageError("give --overlay-per-layer or --overlay-bytes, not both")
    if set_size is not None and set_budget is not None:
        raise click.UsageError("give --set-size or --set-budget, not both")
    from mlxmoe.commands.eval import warn_builtin
    from mlxmoe.quality.calibrate import calibrate

    size = parse_size(overlay_bytes, "--overlay-bytes")
    budget = parse_budget(set_budget)
    warn_builtin(bundle, [("--suite", suites)])
    mode = "json" if as_json else "bar"
    regroup = any(v is not None for v in (overlay_per_layer, overlay_bytes, strategy, set_size, set_budget, n_groups,
                                          source, budgets))
    r = {}
    if regroup or not heal:
        from mlxmoe.quality.layout import parse_budgets

        per_node = clean_errors(parse_budgets, budgets) if budgets else None
        kv = clean_errors(kv_bytes_for, bundle, context) if per_node and any(k == "bytes" for k, _ in per_node) else 0
        r = clean_errors(calibrate, bundle, suites, overlay_per_layer, size, overlay_rule, strategy, source, out, n_groups,
                         not no_super_check, mode, set_size, budget, per_node, kv)
    if heal:
        from mlxmoe.quality.heal import heal_bundle, parse_trainable

        cfg = HealConfig(trainable=clean_errors(parse_trainable, heal_params), max_steps=heal_steps, lr=heal_lr)
        r = {**r, **clean_errors(heal_bundle, r.get("out", bundle), suites, cfg, None if r else out, mode)}
    if as_json:
        click.echo(json.dumps(r))
        return
    if "heal" in r:
        echo_heal(r)
    if "calibration" not in r:
        return
    c = r["calibration"]
    click.echo(f"calibrated {r['out']}  (manifest {r['manifest_hash']})")
    click.echo(f"  tokens: {sum(c['tokens'].values())} over {len(c['tokens'])} domains ({', '.join(c['suites'])})")
    if "layout" in c:
        return echo_layout(c["layout"])
    click.echo(f"  overlay: {c['overlay_per_layer']} experts/layer by {c['overlay_rule']}, "
               f"{c['overlay_bytes_per_node'] / 1e6:.1f} MB per node; grouping: {c['grouping']}")
    if "set_size" in c:
        click.echo(f"  sets: {c['set_size']} experts per node per layer"
                   + (f" (budget {c['set_budget']})" if c.get("set_budget") else "")
                   + f", x{c['mem_ratio']:.2f} the memory of a plain node")
    click.echo(f"  super experts: {c['super_experts'] or 'none found'}")


def kv_bytes_for(bundle: str, context: int) -> float:
    """A node's KV cache at `context` tokens, as `plan` counts it (the bundle's KV bits)."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.bundle.plan import counts_from_config, node_bytes

    m = Manifest.load(bundle)
    k = counts_from_config(m.model["config"])
    return node_bytes(k, 1, context=context, kv_bits=m.quantization.get("kv_bits"))["kv"]


def echo_layout(lay: dict) -> None:
    click.echo(f"  layout for {len(lay['nodes'])} nodes ({', '.join(lay['budgets'])}); placement scores at MoE layer "
               f"{lay['placement']['layers']}; coverage {lay['coverage']:.1%}")
    for g, nd in enumerate(lay["nodes"]):
        q = nd.get("held_out") or {}
        qual = (f"held out: ppl x{q['mean']['ppl_ratio']:.3f} mean / x{q['worst']['ppl_ratio']:.3f} worst, "
                f"agreement {q['mean']['agreement']:.2f}") if q else ""
        what = "every expert (the exact model)" if nd["full_model"] else f"{nd['experts']} experts"
        click.echo(f"  node {g}: {nd['budget']:>8s}  {what}, {nd['bytes'] / 1e6:.1f} MB (x{nd['mem_ratio']:.2f}), "
                   f"whole layers {nd['whole_layers'] or '-'}; {qual}")


def echo_heal(r: dict) -> None:
    h = r["heal"]
    click.echo(f"healed {r['out']}  (manifest {r['manifest_hash']}, {h['seconds']:.0f} s, {', '.join(h['config']['trainable'])})")
    for g, i in h["groups"].items():
        click.echo(f"  group {g}: held-out KL {i['heldout_kl_before']:.4f} -> {i['heldout_kl_after']:.4f} "
                   f"after {i['best_step']} of {i['steps']} steps ({i['train_tokens']} tokens), {i['bytes'] / 1e6:.2f} MB")
