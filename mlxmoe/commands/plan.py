"""`mlxmoe plan`: per-node memory for a model on your Macs (headers only)."""

from __future__ import annotations

import json

import click

from mlxmoe.commands.options import BITS, GROUP_SIZES, KV_BITS, TRUNK_BITS, bits_or_none, check_source
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
@click.option("--chip", default=None, help="Predict speed per mode on this Apple chip (m4-max, m3-ultra, m4-pro, ...; default m4-max with --link).")
@click.option("--link", default=None, help="... over this link: tb5, tb4, 10gbe, 1gbe, wifi or RTT_MS,GBPS (default 10gbe with --chip).")
@click.option("--eval", "eval_report", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Remote-step shares of onehop/split from an `mlxmoe eval --onehop --split --json` report.")
@click.option("--chats", default=3, show_default=True, help="Concurrent chats for the aggregate tok/s.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(source, nodes, context, kv_bits, bits, trunk_bits, group_size, overlay_per_layer, headroom, chip, link,
             eval_report, chats, as_json):
    """Print per-node memory for SOURCE split over your Macs.

    SOURCE: a model directory, a config.json, a repo id in your HF cache, or a
    preset from configs/models (qwen3-30b-a3b, qwen3-235b-a22b, mixtral-8x7b,
    deepseek-v3, kimi-k2.5). Only config.json and safetensors headers are read.

    \b
        mlxmoe plan qwen3-235b-a22b --nodes 3x128GB --context 32768
        mlxmoe plan qwen3-235b-a22b --nodes 3x192GB --chip m3-ultra --link tb5

    With --chip or --link it also predicts, per mode (mlxmoe pin, onehop, split; mlx-lm's
    pipeline and tensor parallel), decode tok/s, TTFT of a 1k prompt, aggregate tok/s of
    --chats chats and bytes on the wire per token (docs/PERFORMANCE.md, the cost model).
    """
    from mlxmoe.bundle.plan import GB, human_count, parse_nodes, plan, size_unit

    bits_, tb, kv = (bits_or_none(x) for x in (bits, trunk_bits, kv_bits))
    check_source(source, "file or directory")
    try:
        r = plan(source, parse_nodes(nodes), headroom=headroom, bits=bits_, trunk_bits=tb, group_size=int(group_size),
                 overlay_per_layer=overlay_per_layer, context=context, kv_bits=kv)
        if "layout" not in r:
            _layout_sets(r)
        if chip or link:
            r["cost"] = _cost(source, len(r["nodes"]), chip or "m4-max", link or "10gbe", bits_, tb, int(group_size),
                              kv, eval_report, chats)
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
    if r["kv_note"]:
        click.echo(f"  kv: {r['kv_note']}")
    if r["heal_bytes_per_node"]:
        click.echo(f"  healed parameters: {r['heal_bytes_per_node'] / 1e6:.2f} MB per node on disk, merged at load "
                   "into weights the node already holds (no extra memory)")
    for i, n in enumerate(r["nodes"]):
        verdict = "fits" if n["fits"] else "does NOT fit"
        click.echo(f"  node {i}: {n['memory'] / GB:.0f} GB, usable {n['usable'] / GB:.1f} GB -> {verdict}"
                   + (f"; {_set_text(n['layout_set'])}" if "layout_set" in n else ""))
    cover = r.get("layout_coverage")
    if cover is not None:
        click.echo(f"  together: {cover['held']} of {cover['of']} experts"
                   + ("" if cover["coverage"] >= 1 else f": coverage {cover['coverage']:.0%}, the "
                      f"{cover['of'] - cover['held']} least used left out by calibrate --budgets (it measures the loss)"))
    if "layout" in r:
        _print_layout(r["layout"])
    fit = r["smallest_fitting_groups"]
    if fit is None:
        click.echo("no group count fits: the trunk + KV alone exceed the smallest node")
    else:
        enough = "" if fit <= len(r["nodes"]) else f" (you have {len(r['nodes'])} nodes: not enough Macs)"
        click.echo(f"smallest group count that fits: {fit}{enough}")
    if "cost" in r:
        _print_cost(r["cost"], chats)


def _layout_sets(r: dict) -> None:
    """Per node, the set `calibrate --budgets` with these Macs' memory would give it: (MoE layer,
    expert) pairs beside the trunk and KV, as plan counts them (quality/layout.node_slots)."""
    from mlxmoe.quality.layout import node_slots

    k, b, headroom = r["counts"], r["per_node"], r["settings"]["headroom"]
    every = k["n_experts"] * k["n_moe_layers"]
    for n in r["nodes"]:
        try:
            (slots,) = node_slots([("bytes", n["memory"])], k["n_experts"], k["n_moe_layers"], r["expert_bytes"],
                                  b["trunk"], b["kv"], headroom, k["top_k"])
            n["layout_set"] = {"experts": slots, "of": every, "full_model": slots >= every}
        except MlxMoeError as e:
            n["layout_set"] = {"experts": None, "of": every, "full_model": False, "why": str(e)}
    held = min(every, sum(n["layout_set"]["experts"] or 0 for n in r["nodes"]))
    r["layout_coverage"] = {"held": held, "of": every, "coverage": round(held / every, 4)}


def _set_text(s: dict) -> str:
    if s["full_model"]:
        return "calibrate --budgets: every expert: the exact model"
    if s["experts"] is None:
        return "calibrate --budgets: too small for top_k experts per layer"
    return f"calibrate --budgets: {s['experts']} of {s['of']} experts ({s['experts'] / s['of']:.0%})"


def _print_layout(lay: dict) -> None:
    from mlxmoe.bundle.plan import size_unit

    click.echo(f"layout ({', '.join(str(x) for x in lay['budgets'])}; coverage {lay['coverage']:.1%}; placement "
               f"scores at MoE layer {', '.join(str(x) for x in lay['placement_layers'])}); per node, from the "
               "bundle's files, and its quality pinned (held-out, vs the full model):")
    for nd in lay["nodes"]:
        what = ("every expert: the exact model" if nd["full_model"]
                else f"{nd['experts']} of {lay['slots_per_node']} experts")
        unit, scale = size_unit(nd["bytes"])
        fits = "" if "fits" not in nd else ("fits with its KV; " if nd["fits"] else "does NOT fit with its KV; ")
        q = nd["expected"]
        qual = (f"ppl x{q['ppl_ratio']:.3f} mean / x{q['worst_ppl_ratio']:.3f} worst, agreement "
                f"{q['agreement']:.2f} / {q['worst_agreement']:.2f}") if q else "quality not measured"
        click.echo(f"  node {nd['group']}: {nd['budget'] or '?':>7s}  {what}, {nd['bytes'] / scale:.2f} {unit} "
                   f"(x{nd['mem_ratio']:.2f}), whole layers {', '.join(map(str, nd['whole_layers'] or [])) or '-'}"
                   f"; {fits}{qual}")


def _cost(source, nodes, chip, link, bits, trunk_bits, group_size, kv_bits, eval_report, chats):
    from mlxmoe.bundle.cost import Weights, estimate, shares_from_eval
    from mlxmoe.bundle.plan import resolve_counts

    shares = shares_from_eval(eval_report) if eval_report else None
    return estimate(resolve_counts(source)[0], nodes, chip, link, Weights(bits, trunk_bits, group_size, kv_bits), shares,
                    chats=chats)


def _print_cost(c, chats):
    from mlxmoe.bundle.cost import mode_name

    s = c["shares"]
    click.echo(f"\npredicted on {c['nodes']} x {c['chip']} over {c['link']} (remote-step shares onehop {s['onehop']:.2f}, "
               f"split {s['split']:.2f}, from {s['source']}):")
    click.echo(f"  {'mode':16s} {'tok/s':>7s} {'TTFT 1k':>9s} {f'{chats} chats':>9s} {'wire B/tok':>11s}")
    for row in c["rows"]:
        name = mode_name(row["mode"])
        click.echo(f"  {name:16s} {row['tok_s']:7.1f} {row['ttft_s'] * 1e3:7.0f} ms {row['agg_tok_s']:9.1f} "
                   f"{row['bytes_per_token']:11.0f}")
    click.echo("  pin is masked routing (approximate); onehop/split are near-exact; the mlx-lm peers are exact")
