"""`mlxmoe init`, `mlxmoe node`, `mlxmoe serve` (loaded lazily by mlxmoe.cli)."""

from __future__ import annotations

import asyncio
import logging

import click

from mlxmoe.units import parse_size
from mlxmoe.cluster import keys


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _key(path: str | None) -> bytes:
    try:
        return keys.load_key(path)
    except keys.ClusterKeyError as e:
        raise click.ClickException(str(e)) from None


KEY_HELP = "Cluster key file (default: $MLXMOE_CLUSTER_KEY_FILE or ~/.config/mlxmoe/cluster.key)."
IFACE_HELP = "Use Bonjour only on the interface with this IPv4 address (default: all interfaces)."


@click.command("init")
@click.option("--path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the key (default: ~/.config/mlxmoe/cluster.key, or $MLXMOE_CLUSTER_KEY_FILE).")
@click.option("--force", is_flag=True, help="Replace an existing key (every Mac then needs the new one).")
def init_cmd(path, force):
    """Create the cluster key shared by your Macs.

    The key is a random secret. Nodes and the router sign every request with
    it, so a device on your network without the key gets nothing. Run this
    once, on one Mac, then copy the file to the same place on the others.
    """
    try:
        p = keys.create_key(path, force=force)
    except FileExistsError as e:
        raise click.ClickException(str(e)) from None
    rel = "~/" + str(p.relative_to(p.home())) if str(p).startswith(str(p.home())) else str(p)
    click.echo(f"Wrote a new cluster key to {p} (readable only by you).\n\n"
               f"Copy it to each of your other Macs, for example:\n"
               f"  ssh OTHER-MAC 'mkdir -p {str(p.parent).replace(str(p.home()), '~')}' && scp {p} OTHER-MAC:{rel}\n"
               f"  ssh OTHER-MAC 'chmod 600 {rel}'\n\n"
               f"Then on every Mac: `mlxmoe node BUNDLE --group N`, and on the one you chat from: "
               f"`mlxmoe serve BUNDLE`.")


@click.command("node")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--group", "-g", type=int, required=True, help="Which expert group of the bundle this Mac serves.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True,
              help="Port to listen on; 0 picks a free one (fine with Bonjour). Use a fixed port, e.g. 7420, "
                   "if the router lists this node in a --peers file.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None, help=KEY_HELP)
@click.option("--kv-bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="KV cache bits: 4 or 8 quantize it (less memory per session), 16 keeps it unquantized. "
                   "Default: what the bundle's manifest says.")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="KV quantization group size (default: 64, or 32 for small attention heads).")
@click.option("--kv-start", default=0, show_default=True,
              help="Quantize a session's KV cache once it holds this many tokens (0: from the start).")
@click.option("--kv-budget", default=None, metavar="SIZE",
              help="Memory for KV caches of all sessions, e.g. 2GB (10^9 bytes) or 2GiB. When full, idle sessions are evicted; "
                   "if none is idle, new sessions are refused (the router tries another Mac).")
@click.option("--advertise/--no-advertise", default=True, show_default=True,
              help="Announce this node on the local network with Bonjour.")
@click.option("--interface", default=None, metavar="IP", help=IFACE_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def node_cmd(bundle, group, host, port, key_file, kv_bits, kv_group_size, kv_start, kv_budget, advertise, interface, verbose):
    """Serve one expert group of BUNDLE on this Mac.

    Loads the trunk, the overlay and expert group GROUP from the bundle made by
    `mlxmoe split`, and answers the router's signed requests. Chats pinned to
    this Mac decode here, locally.

    Example: mlxmoe node ~/models/qwen3-bundle --group 1
    """
    _setup_logging(verbose)
    key = _key(key_file)
    budget = parse_size(kv_budget, "--kv-budget")
    from mlxmoe.cluster.node_server import serve_node

    def load():  # runs on the engine thread: MLX work must stay on the thread that loaded the model
        from mlxmoe.node.engine import Node
        kw = {} if kv_bits is None else {"kv_bits": None if kv_bits == "16" else int(kv_bits)}
        return Node.load(bundle, group, kv_budget_bytes=budget, kv_start=kv_start,
                         kv_group_size=int(kv_group_size) if kv_group_size else None, **kw)

    _run(serve_node(None, key, host=host, port=port, advertise=advertise, interface=interface, factory=load))


def _run(coro) -> None:
    """asyncio.run, with the project's own errors shown as one clear line."""
    from mlxmoe.errors import MlxMoeError
    try:
        asyncio.run(coro)
    except MlxMoeError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. port in use
        raise click.ClickException(f"cannot start: {e}") from None


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address for the API. The default keeps it on this Mac; 0.0.0.0 opens it to your network.")
@click.option("--port", default=8000, show_default=True, help="Port for the API.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None, help=KEY_HELP)
@click.option("--peers", "peers_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file listing nodes to use without Bonjour ([[peers]] url = \"http://IP:PORT\"); "
                   "see configs/cluster.example.toml.")
@click.option("--mdns/--no-mdns", default=True, show_default=True, help="Find nodes with Bonjour.")
@click.option("--interface", default=None, metavar="IP", help=IFACE_HELP)
@click.option("--mode", type=click.Choice(["pin", "soft", "hard", "onehop", "split", "race"]), default=None,
              help="Default routing mode for chats that name none (a request may pick its own with "
                   "\"mlxmoe\": {\"mode\": ...} or the X-Mlxmoe-Mode header). pin: decode locally on the placed Mac "
                   "(default); soft/hard: re-score at turn boundaries and switch the expert group (soft: remote calls) "
                   "or move the chat (hard); onehop: per layer the best group, local or one remote Mac; split: per layer "
                   "the top experts of this Mac and one other (closest to the full model); race: 2-3 "
                   "Macs start the answer, the most confident one keeps it. Also settable as [router] mode in --peers.")
@click.option("--race-tokens", type=click.IntRange(1, 256), default=None, help="Tokens each race candidate generates (default 8).")
@click.option("--migrate-every", type=click.IntRange(0), default=None,
              help="soft/hard: also re-score every N generated tokens (default 0: turn boundaries only).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve_cmd(bundle, host, port, key_file, peers_file, mdns, interface, mode, race_tokens, migrate_every, verbose):
    """Run the router: an OpenAI-compatible API for the whole cluster.

    Loads only the trunk and tokenizer of BUNDLE (to score which expert group
    fits each new chat), finds the nodes (Bonjour and/or --peers), and serves
    http://HOST:PORT/v1 (chat/completions, completions, models), /status
    (JSON) and a status page at /.

    Point any OpenAI client at it: base_url=http://127.0.0.1:8000/v1
    """
    _setup_logging(verbose)
    key = _key(key_file)
    from mlxmoe.cluster.discovery import load_static_peers
    from mlxmoe.cluster.mobility import Mobility, load_router_config
    from mlxmoe.cluster.router import Router
    try:
        static = load_static_peers(peers_file) if peers_file else []
        conf = load_router_config(peers_file) if peers_file else {}
        flags = {"mode": mode, "race_tokens": race_tokens, "check_every": migrate_every}
        mobility = Mobility.from_dict({**conf, **{k: v for k, v in flags.items() if v is not None}})
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    from mlxmoe.cluster.api import serve_router

    def load():  # runs on the router's MLX thread
        from mlxmoe.node.trunk import TrunkFrontend
        return TrunkFrontend.load(bundle)

    router = Router(None, key, frontend_factory=load, static_peers=static, mdns=mdns, interface=interface,
                    mobility=mobility)
    _run(serve_router(router, host, port))
