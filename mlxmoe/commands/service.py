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


ROLE_OPTION = click.option("--role", type=click.Choice(["node", "router", "both"]), default="node", show_default=True,
                           help="node: serve an expert group; router: the API; both: one of each.")
DRY_RUN = click.option("--dry-run", is_flag=True, help="Print what would be written/removed; change nothing.")


@service_cmd.command("install")
@ROLE_OPTION
@click.option("--bundle", type=click.Path(file_okay=False), help="Bundle directory made by `mlxmoe split` (required).")
@click.option("--group", type=int, help="Expert group this Mac serves (required for the node role).")
@DRY_RUN
@click.option("--no-start", is_flag=True, help="Write the files but do not start the service now.")
def service_install(role, bundle, group, dry_run, no_start):
    """Write the service file(s) and start them.

    \b
    Examples:
      mlxmoe service install --bundle ~/models/qwen3-bundle --group 1
      mlxmoe service install --role both --bundle ~/models/qwen3-bundle --group 0 --dry-run
    """
    from mlxmoe.ui import service
    from mlxmoe.errors import MlxMoeError

    try:
        for line in service.install(role, bundle=bundle, group=group, dry_run=dry_run, start_now=not no_start):
            click.echo(line)
    except MlxMoeError as e:
        raise click.ClickException(str(e))


@service_cmd.command("uninstall")
@ROLE_OPTION
@DRY_RUN
def service_uninstall(role, dry_run):
    """Stop the service(s) and remove their files."""
    from mlxmoe.ui import service

    for line in service.uninstall(role, dry_run=dry_run):
        click.echo(line)
