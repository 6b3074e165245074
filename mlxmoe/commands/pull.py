"""`mlxmoe pull`: only the tensors one node needs, from the Hugging Face hub."""

from __future__ import annotations

import json

import click

from mlxmoe.commands.options import (BITS, GROUP_SIZES, KV_BITS, TRUNK_BITS, bits_or_none, clean_errors,
                                     progress_mode, progress_options)


@click.command("pull")
@click.argument("repo")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Branch, tag or commit of REPO (default: main).")
@click.option("--group", type=int, default=None,
              help="The group this Mac serves: pull the trunk and only this group's experts (default: everything).")
@click.option("--groups", "n_groups", type=int, default=None,
              help="With --group: contiguous groups of the experts, as `mlxmoe split --groups N` makes them.")
@click.option("--plan", type=click.Path(exists=True), default=None,
              help="With --group: take the group's experts (and the overlay) from this bundle or layout manifest "
                   "(distribution.json).")
@click.option("--bundle", "bundle_out", type=click.Path(file_okay=False), default=None,
              help="Then write this node's bundle here from what was pulled (quantized as --bits/--trunk-bits say, "
                   "or as the --plan's bundle is).")
@click.option("--bits", type=click.Choice(BITS), default="4", show_default=True,
              help="With --bundle: expert weight bits (16 = keep unquantized).")
@click.option("--group-size", type=click.Choice(GROUP_SIZES), default="64", show_default=True,
              help="With --bundle: quantization group size.")
@click.option("--trunk-bits", type=click.Choice(TRUNK_BITS), default="8", show_default=True,
              help="With --bundle: trunk weight bits (16 = unquantized).")
@click.option("--kv-bits", type=click.Choice(KV_BITS), default="8", show_default=True,
              help="With --bundle: default KV-cache bits for the node (16 = unquantized).")
@click.option("--force", is_flag=True, help="Start over in DEST if it holds a pull of another repo or revision; "
                                             "replace --bundle's directory if it exists.")
@progress_options("Print the result as JSON (progress as JSON lines on stderr).")
def pull_cmd(repo, dest, revision, group, n_groups, plan, bundle_out, bits, group_size, trunk_bits, kv_bits, force,
             quiet, as_json):
    """Download from the Hugging Face hub only what one Mac needs of REPO.

    Reads each safetensors file's header with ranged requests, then fetches
    only the trunk (every tensor that is not a routed expert) and the routed
    experts of --group, into DEST as a checkpoint directory (config,
    tokenizer, an index and shards holding only those tensors). A pull that
    stops resumes where it stopped when run again: tensors already written
    and checked are not fetched again.

    \b
        mlxmoe pull Qwen/Qwen3-30B-A3B ~/pulls/qwen3-30b --group 1 --groups 3 --bundle ~/bundles/qwen3-30b-g1
        mlxmoe pull Qwen/Qwen3-30B-A3B ~/pulls/qwen3-30b --plan layout/distribution.json --group 1 --bundle ~/b

    --bundle then runs split's code on the pulled subset: a bf16 repo is
    quantized on the way (--bits, --trunk-bits), and the node serves it with
    `mlxmoe node BUNDLE --group G`. `mlxmoe split` itself needs every expert,
    so use --bundle for a pulled group. With --plan (a bundle someone split, or
    its distribution.json) the bundle must come out file for file as that
    plan's part and carries its manifest, so this Mac joins that plan's
    cluster; with --groups alone its manifest is its own (a quick start on one
    Mac). The hub is $HF_ENDPOINT if set; a gated or private repo needs `hf
    auth login`.
    """
    from pathlib import Path

    from mlxmoe.bundle.pull import group_experts, plan_experts, pull, split_pulled
    from mlxmoe.progress import progress

    if group is None and (n_groups is not None or plan is not None):
        raise click.UsageError("--groups and --plan choose the experts of a --group: give --group too")
    if group is not None and (n_groups is None) == (plan is None):
        raise click.UsageError("--group needs one of --groups N (contiguous groups) or --plan BUNDLE_OR_MANIFEST")
    if bundle_out is not None and group is None:
        raise click.UsageError(f"--bundle writes one node's bundle: give --group (a whole pull is split with "
                               f"`mlxmoe split {dest} OUT --groups N`)")
    mode = progress_mode(quiet, as_json)

    def go():
        if plan is not None:
            experts = plan_experts(plan, group)
        elif group is not None:
            experts = lambda config: group_experts(config, group, n_groups)  # noqa: E731 (needs the repo's config)
        else:
            experts = None
        with progress(None, f"pull {repo}", mode, lazy=True) as p:
            report = pull(repo, dest, experts, revision, p.advance, on_total=lambda n: setattr(p, "total", n),
                          force=force)
        report["bundle"] = report["manifest_hash"] = None
        if bundle_out is not None:
            with progress(report["pulled"], f"bundle {Path(bundle_out).name}", mode, lazy=True) as p:
                m = split_pulled(dest, bundle_out, group, n_groups, plan, bits_or_none(bits), int(group_size),
                                 bits_or_none(trunk_bits), bits_or_none(kv_bits), force, p.advance)
            report["bundle"], report["manifest_hash"] = bundle_out, m.hash
        return report

    r = clean_errors(go)
    if as_json:
        click.echo(json.dumps(r))
        return
    share = f" ({100 * r['pulled'] / r['repo_bytes']:.0f}% of the repo)" if r["repo_bytes"] else ""
    click.echo(f"pulled {r['pulled'] / 1e6:.1f} MB of {r['repo_bytes'] / 1e6:.1f} MB{share} into {dest}: "
               f"{r['tensors']} tensors; downloaded {r['downloaded'] / 1e6:.1f} MB this run, "
               f"{r['reused'] / 1e6:.1f} MB were already here")
    if r["bundle"]:
        click.echo(f"wrote {r['bundle']} (manifest {r['manifest_hash']}); serve it with "
                   f"`mlxmoe node {r['bundle']} --group {group}`")
    elif group is not None:
        click.echo("next: the same command with --bundle OUT writes this node's bundle")
    else:
        click.echo(f"next: mlxmoe split {dest} OUT --groups N")
