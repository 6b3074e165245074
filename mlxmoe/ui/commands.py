"""Click commands for the user-facing parts; `mlxmoe/cli.py` loads them lazily.
Each command imports its module only when it runs, so `--help` stays fast."""

from __future__ import annotations

import sys

import click

from mlxmoe.ui import DEFAULT_URL


def url_option(what: str = "The mlxmoe router"):
    return click.option("--url", default=DEFAULT_URL, show_default=True, envvar="MLXMOE_URL",
                        help=f"{what}. Env: MLXMOE_URL.")


@click.command("chat")
@url_option("The router, or any OpenAI-compatible server")
@click.option("--model", help="Model id to ask for (default: the first one the server lists).")
@click.option("--system", "system", metavar="TEXT", help="System prompt for the conversation.")
@click.option("--once", metavar="QUESTION", help="Ask one question, print the answer, exit (no prompt; for scripts).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print one JSON object (answer + stats).")
@click.option("--api-key", envvar="MLXMOE_API_KEY", help="Bearer token, for servers that need one. Env: MLXMOE_API_KEY.")
def chat_cmd(url, model, system, once, as_json, api_key):
    """Chat in the terminal with the cluster (or any OpenAI-compatible server).

    Enter sends, Esc Enter (Alt-Enter) starts a new line. Type /help for the
    commands (/new, /system, /status, /quit). After each answer a grey line
    shows which Mac and expert group served it, the placement margin,
    tokens/s and time to first token.

    \b
    Examples:
      mlxmoe chat
      mlxmoe chat --once "Why is the sky blue?"
      mlxmoe chat --url http://localhost:1234 --model qwen3   # LM Studio
    """
    from mlxmoe.ui import chat

    if once is not None:
        sys.exit(chat.run_once(url, once, model=model, system=system, as_json=as_json, api_key=api_key))
    if as_json:
        raise click.UsageError("--json works with --once only")
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal on stdin: use --once \"question\" in scripts")
    sys.exit(chat.run_interactive(url, model=model, system=system, api_key=api_key))


@click.command("doctor")
@click.option("--url", default=None, envvar="MLXMOE_URL",
              help=f"Router to check (default {DEFAULT_URL}; only a warning if none runs there). Env: MLXMOE_URL.")
@click.option("--bundle", type=click.Path(file_okay=False, path_type=str), help="Bundle directory to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_cmd(url, bundle, as_json):
    """Check this Mac's setup and the cluster, and say what to fix.

    Looks at MLX and its GPU backend, memory, Bonjour (mDNS), the cluster key,
    the router's peers and their manifests, and a bundle if you name one.
    Exits non-zero when any check fails.
    """
    from mlxmoe.ui import doctor

    checks = doctor.run_checks(url=url, bundle=bundle)
    doctor.report(checks, as_json=as_json)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


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
