"""`mlxmoe serve`: the router (OpenAI-compatible API, placement, status page)."""

from __future__ import annotations

import click

from mlxmoe.commands.options import (api_key_option, api_keys, check_bind, check_port, interface_option, key_option,
                                     load_key, load_tls, log_options, mode_option, run_server, setup_logging,
                                     tls_option)


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address for the API. The default keeps it on this Mac; 0.0.0.0 opens it to your network.")
@click.option("--port", default=8000, show_default=True, help="Port for the API.")
@api_key_option
@key_option
@click.option("--peers", "peers_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file listing nodes to use without Bonjour ([[peers]] url = \"http://IP:PORT\"); "
                   "see configs/cluster.example.toml.")
@click.option("--mdns/--no-mdns", default=True, show_default=True, help="Find nodes with Bonjour.")
@interface_option
@mode_option(None, "Default routing mode for chats that name none (a request may pick its own with "
                   "\"mlxmoe\": {\"mode\": ...} or the X-Mlxmoe-Mode header). pin: decode locally on the placed Mac "
                   "(default); soft/hard: re-score at turn boundaries and switch the expert group (soft: remote calls) "
                   "or move the chat (hard); onehop: per layer the best group, local or one remote Mac; split: per layer "
                   "the top experts of this Mac and one other (closest to the full model); race: 2-3 "
                   "Macs start the answer, the most confident one keeps it. Also settable as [router] mode in --peers.")
@click.option("--race-tokens", type=click.IntRange(1, 256), default=None, help="Tokens each race candidate generates (default 8).")
@click.option("--migrate-every", type=click.IntRange(0), default=None,
              help="soft/hard: also re-score every N generated tokens (default 0: turn boundaries only).")
@tls_option
@log_options
def serve_cmd(bundle, host, port, api_key, key_file, peers_file, mdns, interface, mode, race_tokens, migrate_every,
              plain_http, verbose, log_level, log_json):
    """Run the router: an OpenAI-compatible API for the whole cluster.

    Loads only the trunk and tokenizer of BUNDLE (to score which expert group
    fits each new chat), finds the nodes (Bonjour and/or --peers), and serves
    http://HOST:PORT/v1 (chat/completions, completions, models), /status
    (JSON), /health, a status page at / and a web chat page at /chat.

    Point any OpenAI client at it: base_url=http://127.0.0.1:8000/v1
    """
    setup_logging(verbose, log_level, log_json)
    keys = api_keys(api_key)
    check_bind(host, keys)
    check_port(host, port)  # before the trunk loads
    key = load_key(key_file)
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

    import socket
    tls = load_tls(key_file, plain_http, socket.gethostname().split(".")[0] or "mac")  # one certificate per Mac
    router = Router(None, key, frontend_factory=load, static_peers=static, mdns=mdns, interface=interface,
                    mobility=mobility, tls=tls, api_keys=keys)
    from mlxmoe.ui import chat_page
    from mlxmoe.ui.status_page import render

    run_server(serve_router(router, host, port, page=render, chat_page=chat_page.render), host, port)
