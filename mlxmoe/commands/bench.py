"""`mlxmoe bench` (also tools/bench_decode.py): decode speed and memory of a
node vs mlx-lm, same model, same machine."""

from __future__ import annotations

import click


@click.command("bench")
@click.option("--bundle", help="A bundle from `mlxmoe split` (else one is made from --source/--synthetic).")
@click.option("--source", help="The checkpoint the bundle was split from (mlx-lm loads it).")
@click.option("--synthetic", help="Preset name in configs/models for a random-weight model.")
@click.option("--layers", type=int, default=12)
@click.option("--bits", type=int, default=4)
@click.option("--groups", type=int, default=3)
@click.option("--group", type=int, default=0, help="Which group the one-group node loads.")
@click.option("--prompt-tokens", type=int, default=128)
@click.option("--gen", "gen_tokens", type=int, default=128)
@click.option("--runs", type=int, default=3)
@click.option("--kv-bits", type=int, default=8, help="KV bits for both mlx-lm and the node (0 = unquantized).")
@click.option("--bandwidth", type=float, help="Device memory bandwidth in GB/s (default: measured copy).")
@click.option("--workdir", default="/tmp/mlxmoe-bench-decode")
@click.option("--unfused-row", is_flag=True,
              help="Also time a node (all experts) on mlx-lm's own MoE block code (MoE path 'mlx-lm').")
@click.option("--profile", is_flag=True,
              help="Per-op profile of one decode step (ops by primitive, module time shares) per model.")
def bench_cmd(**kw):
    """Decode speed and memory: mlx-lm vs a node, same model.

    \b
        mlxmoe bench --bundle BUNDLE --source SRC        # a split model and its source
        mlxmoe bench --synthetic qwen3-30b-a3b --layers 12 --bits 4   # random weights

    Rows: mlx-lm (full model), node with every expert eligible, node with one of
    the bundle's groups. Columns: prompt tok/s, decode tok/s (median of --runs),
    time to first token, resident memory (MLX active memory) against the
    arithmetic trunk + group + overlay + KV, and the share of the memory-bandwidth
    roofline (bytes touched per decoded token / time per token / bandwidth).
    Prints a table and one JSON line per row.
    """
    from mlxmoe.node.bench import bench

    bench(**kw)
