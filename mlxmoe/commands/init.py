"""`mlxmoe init`: create the cluster key shared by your Macs."""

from __future__ import annotations

import click

from mlxmoe.cluster import keys


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
