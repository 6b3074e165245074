"""`mlxmoe node`: serve one expert group of a bundle on this Mac."""

from __future__ import annotations

import click

from mlxmoe.commands.options import (check_port, interface_option, key_option, kv_options, load_key, load_tls,
                                     parse_size, run_server, setup_logging, tls_option, log_options)

_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """'90', '90s', '30m', '1h', '2d' -> seconds (> 0)."""
    t = text.strip().lower()
    unit = _SECONDS.get(t[-1:], None)
    try:
        value = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise click.BadParameter(f"{text!r}: use seconds or a number with s, m, h or d, e.g. 30m", param_hint=option)
    return value


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
            "KV quantization group size (default: 64, or 32 for small attention heads).")
@click.option("--kv-budget", default=None, metavar="SIZE",
              help="Memory for KV caches of all sessions, e.g. 2GB (10^9 bytes) or 2GiB. When full, idle sessions are evicted; "
                   "if none is idle, new sessions are refused (the router tries another Mac).")
@click.option("--session-ttl", default="1h", show_default=True, metavar="DURATION",
              help="Close sessions idle this long, e.g. 30m or 2h (a router that restarted never closes them).")
@click.option("--max-streams", default=16, show_default=True, type=click.IntRange(min=1),
              help="Chats decoded at once, in one batched step; more wait in order, holding no KV cache.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(min=0),
              help="Chats that may wait beyond --max-streams; past that a new chat gets 429 with Retry-After "
                   "(the router tries another Mac first).")
@click.option("--ring", "ring_hostfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Join the nodes started with this mx.distributed hostfile (JSON list of ip:port, one per group, in "
                   "group order): experts calls between them go over mx.distributed, HTTP stays the fallback. "
                   "Not encrypted: private links only (docs/SECURITY.md).")
@click.option("--advertise/--no-advertise", default=True, show_default=True,
              help="Announce this node on the local network with Bonjour.")
@interface_option
@tls_option
@log_options
def node_cmd(bundle, group, host, port, key_file, kv_bits, kv_group_size, kv_budget, session_ttl, max_streams,
             max_queue, ring_hostfile, advertise, interface, plain_http, verbose, log_level, log_json):
    """Serve one expert group of BUNDLE on this Mac.

    Loads the trunk, the overlay and expert group GROUP from the bundle made by
    `mlxmoe split`, and answers the router's signed requests. Chats pinned to
    this Mac decode here, locally.

    Example: mlxmoe node ~/models/qwen3-bundle --group 1
    """
    from mlxmoe.commands.run import check_group

    check_group(bundle, group)  # before MLX and the engine thread start
    check_port(host, port)
    setup_logging(verbose, log_level, log_json)
    key = load_key(key_file)
    import socket
    tls = load_tls(key_file, plain_http, socket.gethostname().split(".")[0] or "mac", host)
    budget = parse_size(kv_budget, "--kv-budget")
    ttl = parse_duration(session_ttl, "--session-ttl")
    from mlxmoe.cluster.node_server import serve_node

    def load():  # runs on the engine thread: MLX work must stay on the thread that loaded the model
        from mlxmoe.node.engine import Node
        kw = {} if kv_bits is None else {"kv_bits": None if kv_bits == "16" else int(kv_bits)}
        node = Node.load(bundle, group, kv_budget_bytes=budget,
                         kv_group_size=int(kv_group_size) if kv_group_size else None, **kw)
        if ring_hostfile:  # waits for every rank of the group
            from mlxmoe.node.remote.ring import join
            join(node, ring_hostfile, group)
        return node

    run_server(serve_node(None, key, host=host, port=port, advertise=advertise, interface=interface, factory=load,
                           tls=tls, session_ttl=ttl, max_streams=max_streams, max_queue=max_queue), host, port)
