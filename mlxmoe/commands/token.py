"""`mlxmoe token`: make a join token on the first Mac (docs/SECURITY.md, "Joining")."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import click

from mlxmoe.commands.options import clean_errors, run_server, setup_logging

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'1h', '30m', '90s', '2d' or plain seconds -> seconds (> 0)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(text).lower())
    if not m or float(m[1]) * _UNITS[m[2]] <= 0:
        raise click.BadParameter(f"{text!r}: a duration like 1h, 30m, 90s or 2d (more than 0)", param_hint="--ttl")
    return float(m[1]) * _UNITS[m[2]]


@click.command("token")
@click.option("--ttl", default="1h", show_default=True, help="How long the token can be used (1h, 30m, 2d, ...).")
@click.option("--uses", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="How many Macs may join with it.")
@click.option("--host", default=None, metavar="ADDRESS",
              help="The address other Macs reach this one at (default: this Mac's LAN address).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="The join server's port (default: 7419).")
@click.option("--serve", is_flag=True,
              help="Then serve joins here until the token is used up or expires (Ctrl-C stops); "
                   "`mlxmoe up` serves them otherwise.")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Config folder with cluster.key, ca.pem and ca.key (default: $MLXMOE_HOME or ~/.config/mlxmoe).")
@click.option("--join", "join_token", default=None, hidden=True, metavar="TOKEN",
              help="(Until `mlxmoe up --join` exists, and for tests) join this Mac with TOKEN.")
@click.option("--name", default=None, hidden=True, help="With --join: this Mac's name in its certificate.")
@click.option("--force", is_flag=True, hidden=True, help="With --join: replace this Mac's key, CA and certificate.")
@click.option("-v", "--verbose", is_flag=True, help="With --serve: log each join too (refusals are always logged).")
def token_cmd(ttl, uses, host, port, serve, home, join_token, name, force, verbose):
    """Print a join token: on another Mac, `mlxmoe up --join TOKEN` joins
    this cluster with it, getting its certificate and the cluster key over
    TLS, so nothing is copied by hand.

    The token holds a one-time secret (expiring after --ttl, good for --uses
    Macs), this Mac's address and a fingerprint of the cluster CA, which the
    other Mac checks before it sends anything. Run it on the Mac that holds
    ca.key (where you ran `mlxmoe init`). Treat a token like a password until
    it is used or expired.
    """
    from mlxmoe.cluster import join

    home = Path(home).expanduser() if home else join.default_home()
    if join_token:
        if verbose:
            setup_logging(False, "info")
        ident = clean_errors(join.join, join_token, home, name=name, force=force)  # TlsError too: an MlxMoeError
        click.echo(f"Joined: wrote cluster.key, ca.pem, cert.pem and cert.key to {ident.ca.parent}.")
        return
    seconds = parse_duration(ttl)
    tok = clean_errors(join.create_token, home, ttl=seconds, uses=uses, host=host, port=port or join.JOIN_PORT)
    click.echo(str(tok))
    click.echo(f"on the other Mac: mlxmoe up --join '{tok}'")
    until = time.strftime("%H:%M", time.localtime(time.time() + seconds))
    uses_text = "1 Mac" if uses == 1 else f"{uses} Macs"
    click.echo(f"(valid until {until} for {uses_text}; the join server must run here: `mlxmoe up`, "
               f"or `mlxmoe token --serve`)", err=True)
    if len(str(tok)) > 119:
        click.echo("(a long token: --host with this Mac's IP address makes it shorter)", err=True)
    if serve:
        setup_logging(False, "info" if verbose else "warning")
        bound = port or join.JOIN_PORT

        def ready(running):
            click.echo(f"Serving joins on port {running.port} until token {tok.id} is used up or expires "
                       f"(Ctrl-C stops).", err=True)
            sys.stderr.flush()
        run_server(join.serve_join(home, "0.0.0.0", bound, until_spent=tok.id, ready=ready), "0.0.0.0", bound)
