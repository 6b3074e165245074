"""`mlxmoe menubar`: the menu-bar app (macOS)."""

from __future__ import annotations

import click

from mlxmoe.commands.options import url_option


@click.command("menubar")
@url_option()
@click.option("--print", "print_once", is_flag=True, help="Print the menu's state once and exit (any OS).")
@click.option("--node-name", help="This Mac's host name as its nodes advertise it (default: this host's name).")
def menubar_cmd(url, print_once, node_name):
    """Menu-bar app (macOS): cluster state, start/stop node, open chat.

    Needs macOS and rumps (`pip install 'mlxmoe[menubar]'`). On any system,
    --print shows what the menu would show right now.
    """
    from mlxmoe.ui import menubar

    if print_once:
        click.echo(menubar.current_state(url, node_name).render_text())
        return
    try:
        menubar.run_menubar(url, node_name)
    except menubar.MenubarUnavailable as e:
        raise click.ClickException(f"{e}\nTry `mlxmoe menubar --print` to see the cluster state here.")
