"""The `mlxmoe` command line. Subcommands are imported only when used, so
`mlxmoe --help` stays fast; a module that fails to import raises its own error
(never a misleading "No such command")."""

from __future__ import annotations

import importlib

import click

# name -> (module in mlxmoe/commands/, attribute, one-line help shown in `mlxmoe --help`)
COMMANDS = {
    "up": ("mlxmoe.commands.up", "up_cmd", "Create or join the cluster, get this Mac's part and serve: one command per Mac."),
    "plan": ("mlxmoe.commands.plan", "plan_cmd", "Show per-node memory for a model on your Macs (reads headers only)."),
    "split": ("mlxmoe.commands.split", "split_cmd", "Split a checkpoint into trunk + expert-group bundles + manifest."),
    "copy": ("mlxmoe.commands.copy", "copy_cmd", "Copy the files one node needs from a bundle, verified."),
    "pull": ("mlxmoe.commands.pull", "pull_cmd", "Fetch only the tensors one node needs from the Hugging Face hub."),
    "run": ("mlxmoe.commands.run", "run_cmd", "Generate on one node, no network: a quick end-to-end check."),
    "calibrate": ("mlxmoe.commands.calibrate", "calibrate_cmd", "Measure gate statistics; choose an overlay (and grouping)."),
    "eval": ("mlxmoe.commands.eval", "eval_cmd", "Measure how far masked routing is from the full model."),
    "bench": ("mlxmoe.commands.bench", "bench_cmd", "Decode speed and memory of a node vs mlx-lm."),
    "init": ("mlxmoe.commands.init", "init_cmd", "Create the cluster key shared by your Macs."),
    "token": ("mlxmoe.commands.token", "token_cmd", "Print a join token another Mac joins this cluster with."),
    "node": ("mlxmoe.commands.node", "node_cmd", "Serve one expert group of a bundle on this Mac."),
    "serve": ("mlxmoe.commands.serve", "serve_cmd", "Run the router: OpenAI-compatible API, placement, status page."),
    "chat": ("mlxmoe.commands.chat", "chat_cmd", "Chat in the terminal with the cluster (or any OpenAI-compatible server)."),
    "demo": ("mlxmoe.commands.demo", "demo_cmd", "Offline demo: split the bundled model, start nodes + router, chat."),
    "doctor": ("mlxmoe.commands.doctor", "doctor_cmd", "Check this Mac's setup and the cluster, and say what to fix."),
    "menubar": ("mlxmoe.commands.menubar", "menubar_cmd", "Menu-bar app (macOS): cluster state, start/stop node, open chat."),
    "service": ("mlxmoe.commands.service", "service_cmd", "Install or remove the login service (launchd / systemd --user)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxmoe")
def main():
    """mlxmoe: one Mixture-of-Experts LLM across the Macs you own.

    Every Mac holds the model's trunk plus one group of its experts; a chat is
    pinned to the Mac whose group fits it best and decodes there, locally.

    Start with `mlxmoe demo` (offline, bundled model), or on real Macs:
    `mlxmoe plan`, `mlxmoe split`, `mlxmoe init`, `mlxmoe node`, `mlxmoe chat`.
    """


if __name__ == "__main__":
    main()
