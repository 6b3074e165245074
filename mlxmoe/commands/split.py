"""`mlxmoe split`: checkpoint -> trunk + expert groups + overlay + manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mlxmoe.commands.options import (BITS, GROUP_SIZES, KV_BITS, TRUNK_BITS, bits_or_none, check_source,
                                     clean_errors, progress_mode, progress_options)


@click.command("split")
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--groups", "n_groups", type=int, required=True, help="Number of expert groups (one per Mac).")
@click.option("--overlay", type=click.Path(dir_okay=False), help='JSON: experts every node holds, {"all": [ids]} or {"layers": {"<layer>": [ids]}}.')
@click.option("--grouping", type=click.Path(dir_okay=False), help='JSON: explicit grouping, {"groups": [[ids], ...]} or {"layers": {"<layer>": [[ids], ...]}}; add "overlap": true for groups that share experts (every expert in at least one). Default: contiguous ranges.')
@click.option("--bits", type=click.Choice(BITS), default="4", show_default=True, help="Expert weight bits (16 = keep unquantized).")
@click.option("--group-size", type=click.Choice(GROUP_SIZES), default="64", show_default=True, help="Quantization group size.")
@click.option("--trunk-bits", type=click.Choice(TRUNK_BITS), default="8", show_default=True, help="Trunk weight bits (16 = unquantized).")
@click.option("--kv-bits", type=click.Choice(KV_BITS), default="8", show_default=True, help="Default KV-cache bits for nodes (16 = unquantized).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@progress_options("Print the result as JSON (progress as JSON lines on stderr).")
def split_cmd(source, out, n_groups, overlay, grouping, bits, group_size, trunk_bits, kv_bits, force, quiet, as_json):
    """Split SOURCE into per-node bundles in OUT.

    SOURCE is a local Hugging Face model directory (model.safetensors or sharded
    model-*.safetensors + index), an mlx-community quantized MLX directory, or a
    repo id already in your Hugging Face cache (nothing is downloaded).

    OUT receives trunk.safetensors (every node), experts-group-XX.safetensors
    (one per node), experts-overlay.safetensors (every node, if --overlay) and
    distribution.json (the manifest). Example:

    \b
        mlxmoe split Qwen/Qwen3-30B-A3B bundles/qwen3-30b --groups 3
    """
    from mlxmoe.bundle.checkpoint import open_source
    from mlxmoe.bundle.split import load_json_arg, split
    from mlxmoe.progress import progress

    bits_, tb, kv = (bits_or_none(x) for x in (bits, trunk_bits, kv_bits))
    check_source(source)

    def go():
        ov = load_json_arg(overlay, "overlay") if overlay else None
        gr = load_json_arg(grouping, "grouping") if grouping else None
        src = open_source(source)
        total = sum(t.nbytes for f in {id(f): f for f in src.files.values()}.values() for t in f.tensors.values())
        # lazy: split validates (groups, grouping, OUT) before its first write, and an error there draws no 0% bar
        with progress(total, f"split {Path(source).name}", progress_mode(quiet, as_json), lazy=True) as p:
            return split(source, out, n_groups, ov, gr, bits_, int(group_size), tb, kv, force, p.advance)

    t0 = time.time()
    m = clean_errors(go)
    summary = {"out": out, "manifest_hash": m.hash, "n_groups": m.n_groups, "seconds": round(time.time() - t0, 2),
               "files": {k: v["size"] for k, v in m.files.items() if v["role"] != "meta"}}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {out}  (manifest {m.hash}, {m.n_groups} groups)")
        for k, v in summary["files"].items():
            click.echo(f"  {k:32s} {v / 1e6:10.1f} MB")
