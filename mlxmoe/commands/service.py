"""`mlxmoe service install|uninstall`: the login service."""

from __future__ import annotations

import click


@click.group("service")
def service_cmd():
    """Install or remove the login service (launchd / systemd --user).

    The service starts mlxmoe when you log in and restarts it if it stops.
    macOS: ~/Library/LaunchAgents/com.mlxmoe.<role>.plist, logs in
    ~/Library/Logs/mlxmoe. Linux: ~/.config/systemd/user/mlxmoe-<role>.service.
    """


ROLE_OPTION = click.option("--role", type=click.Choice(["node", "router", "both", "up"]), default="node",
                           show_default=True, help="node: serve an expert group; router: the API; both: one of each; "
                                                   "up: `mlxmoe up` (this Mac's part of the cluster).")
PORT = click.IntRange(1, 65535)
DRY_RUN = click.option("--dry-run", is_flag=True, help="Print what would be written/removed; change nothing.")


@service_cmd.command("install")
@ROLE_OPTION
@click.option("--bundle", type=click.Path(file_okay=False), help="Bundle directory made by `mlxmoe split` (required).")
@click.option("--group", type=int, help="Expert group this Mac serves (required for the node role).")
@click.option("--port", type=PORT, help="The port the service listens on (node: its --port; router and up: the "
                                        "API's). With --role both use --node-port / --router-port.")
@click.option("--node-port", type=PORT, help="The node's port (e.g. 7420, for a router's --peers file).")
@click.option("--router-port", type=PORT, help="The router's API port (default 8000).")
@click.option("--peers", type=click.Path(exists=True, dir_okay=False),
              help="The router's --peers file: nodes to use without Bonjour (configs/cluster.example.toml).")
@click.option("--source", help="--role up on the first Mac: the model it serves (`mlxmoe up SOURCE`); "
                               "left out on a Mac that joined (it restarts from its up.json).")
@click.option("--memory", help="--role up: the memory this Mac's node may use, e.g. 48GB (`mlxmoe up --memory`).")
@DRY_RUN
@click.option("--no-start", is_flag=True, help="Write the files but do not start the service now.")
def service_install(role, bundle, group, port, node_port, router_port, peers, source, memory, dry_run, no_start):
    """Write the service file(s) and start them.

    \b
    Examples:
      mlxmoe service install --bundle ~/models/qwen3-bundle --group 1 --port 7420
      mlxmoe service install --role router --bundle ~/models/qwen3-bundle --peers ~/peers.toml
      mlxmoe service install --role both --bundle ~/models/qwen3-bundle --group 0 --dry-run
      mlxmoe service install --role up --source mlx-community/Qwen3-30B-A3B-4bit --memory 48GB   # the first Mac
      mlxmoe service install --role up --memory 24GB       # a Mac that joined with `mlxmoe up --join`
    """
    from mlxmoe.commands.options import parse_size
    from mlxmoe.ui import service
    from mlxmoe.errors import MlxMoeError

    if memory is not None:
        parse_size(memory, "--memory")  # checked now, not at the first login
    ports = service_ports(role, port, node_port, router_port)
    if peers and role == "node":
        raise click.BadParameter("the --peers file is the router's: use --role router or both", param_hint="--peers")
    try:
        for line in service.install(role, bundle=bundle, group=group, dry_run=dry_run, start_now=not no_start,
                                    ports=ports, peers=peers, source=source, memory=memory):
            click.echo(line)
    except MlxMoeError as e:
        raise click.ClickException(str(e))


def service_ports(role: str, port, node_port, router_port) -> dict[str, int]:
    """role -> port from --port / --node-port / --router-port."""
    if port is not None and role == "both":
        raise click.BadParameter("with --role both, say whose: --node-port or --router-port", param_hint="--port")
    ports = {"node": node_port, "router": router_port}
    if role == "up":  # `mlxmoe up --port` is its router's
        ports = {"node": node_port, "up": port if port is not None else router_port}
    elif port is not None:
        ports[role] = port
    return {r: p for r, p in ports.items() if p is not None}


@service_cmd.command("uninstall")
@ROLE_OPTION
@DRY_RUN
def service_uninstall(role, dry_run):
    """Stop the service(s) and remove their files."""
    from mlxmoe.ui import service

    for line in service.uninstall(role, dry_run=dry_run):
        click.echo(line)
