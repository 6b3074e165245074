"""`mlxmoe plan`: per-node memory for a model on your Macs (headers only)."""

from __future__ import annotations

import json

import click

from mlxmoe.commands.options import BITS, GROUP_SIZES, KV_BITS, TRUNK_BITS, bits_or_none
from mlxmoe.errors import MlxMoeError


@click.command("plan")
@click.argument("source")
@click.option("--nodes", default="3x64GB", show_default=True, help="Your Macs' memory: 3x64GB, or 64GB,96GB,128GB.")
@click.option("--context", default=32768, show_default=True, help="Context length to budget KV for (per node, one session).")
@click.option("--kv-bits", type=click.Choice(KV_BITS), default="8", show_default=True)
@click.option("--bits", type=click.Choice(BITS), default="4", show_default=True, help="Expert bits.")
@click.option("--trunk-bits", type=click.Choice(TRUNK_BITS), default="8", show_default=True)
@click.option("--group-size", type=click.Choice(GROUP_SIZES), default="64", show_default=True)
@click.option("--overlay-per-layer", default=0, show_default=True, help="Experts per layer replicated on every node.")
@click.option("--headroom", default=0.75, show_default=True, help="Share of each Mac's memory the model may use (macOS keeps the rest).")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(source, nodes, context, kv_bits, bits, trunk_bits, group_size, overlay_per_layer, headroom, as_json):
    """Print per-node memory for SOURCE split over your Macs.

    SOURCE: a model directory, a config.json, a repo id in your HF cache, or a
    preset from configs/models (qwen3-30b-a3b, qwen3-235b-a22b, mixtral-8x7b,
    deepseek-v3, kimi-k2.5). Only config.json and safetensors headers are read.

        mlxmoe plan qwen3-235b-a22b --nodes 3x128GB --context 32768
    """
    from mlxmoe.bundle.plan import GB, human_count, parse_nodes, plan, size_unit

    bits_, tb, kv = (bits_or_none(x) for x in (bits, trunk_bits, kv_bits))
    try:
        r = plan(source, parse_nodes(nodes), headroom=headroom, bits=bits_, trunk_bits=tb, group_size=int(group_size),
                 overlay_per_layer=overlay_per_layer, context=context, kv_bits=kv)
    except MlxMoeError as e:  # its message names the source already
        raise click.ClickException(str(e)) from None
    except KeyError as e:
        raise click.ClickException(f"{source}: config.json has no {e}") from None
    if as_json:
        click.echo(json.dumps(r))
        return
    b = r["per_node"]
    click.echo(f"{source}: {human_count(r['params_total'])} parameters ({human_count(r['params_active'])} active per token), from {r['basis']}")
    unit, scale = size_unit(b["total"])
    click.echo(f"{r['n_groups']} groups, one per node; per node ({unit}):")
    for k in ("trunk", "group", "overlay", "kv", "total"):
        click.echo(f"  {k:8s} {b[k] / scale:9.2f}")
    if r["heal_bytes_per_node"]:
        click.echo(f"  healed parameters: {r['heal_bytes_per_node'] / 1e6:.2f} MB per node on disk, merged at load "
                   "into weights the node already holds (no extra memory)")
    for i, n in enumerate(r["nodes"]):
        verdict = "fits" if n["fits"] else "does NOT fit"
        click.echo(f"  node {i}: {n['memory'] / GB:.0f} GB, usable {n['usable'] / GB:.1f} GB -> {verdict}")
    fit = r["smallest_fitting_groups"]
    if fit is None:
        click.echo("no group count fits: the trunk + KV alone exceed the smallest node")
    else:
        enough = "" if fit <= len(r["nodes"]) else f" (you have {len(r['nodes'])} nodes: not enough Macs)"
        click.echo(f"smallest group count that fits: {fit}{enough}")
