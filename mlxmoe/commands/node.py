"""`mlxmoe node`: serve one expert group of a bundle on this Mac."""

from __future__ import annotations

import click

from mlxmoe.commands.options import (interface_option, key_option, kv_options, load_key, parse_size, run_server,
                                     setup_logging, verbose_option)


@click.command("node")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--group", "-g", type=int, required=True, help="Which expert group of the bundle this Mac serves.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True,
              help="Port to listen on; 0 picks a free one (fine with Bonjour). Use a fixed port, e.g. 7420, "
                   "if the router lists this node in a --peers file.")
@key_option
@kv_options("KV cache bits: 4 or 8 quantize it (less memory per session), 16 keeps it unquantized. "
            "Default: what the bundle's manifest says.",
            "KV quantization group size (default: 64, or 32 for small attention heads).",
            "Quantize a session's KV cache once it holds this many tokens (0: from the start).")
@click.option("--kv-budget", default=None, metavar="SIZE",
              help="Memory for KV caches of all sessions, e.g. 2GB (10^9 bytes) or 2GiB. When full, idle sessions are evicted; "
                   "if none is idle, new sessions are refused (the router tries another Mac).")
@click.option("--advertise/--no-advertise", default=True, show_default=True,
              help="Announce this node on the local network with Bonjour.")
@interface_option
@verbose_option
def node_cmd(bundle, group, host, port, key_file, kv_bits, kv_group_size, kv_start, kv_budget, advertise, interface, verbose):
    """Serve one expert group of BUNDLE on this Mac.

    Loads the trunk, the overlay and expert group GROUP from the bundle made by
    `mlxmoe split`, and answers the router's signed requests. Chats pinned to
    this Mac decode here, locally.

    Example: mlxmoe node ~/models/qwen3-bundle --group 1
    """
    from mlxmoe.commands.run import check_group

    check_group(bundle, group)  # before MLX and the engine thread start
    setup_logging(verbose)
    key = load_key(key_file)
    budget = parse_size(kv_budget, "--kv-budget")
    from mlxmoe.cluster.node_server import serve_node

    def load():  # runs on the engine thread: MLX work must stay on the thread that loaded the model
        from mlxmoe.node.engine import Node
        kw = {} if kv_bits is None else {"kv_bits": None if kv_bits == "16" else int(kv_bits)}
        return Node.load(bundle, group, kv_budget_bytes=budget, kv_start=kv_start,
                         kv_group_size=int(kv_group_size) if kv_group_size else None, **kw)

    run_server(serve_node(None, key, host=host, port=port, advertise=advertise, interface=interface, factory=load))
