"""`mlxmoe demo`: the whole system on one machine, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mlxmoe.commands.options import clean_errors, mode_option
from mlxmoe.modes import DEFAULT_MODE


@click.command("demo")
@click.option("--groups", default=3, show_default=True, help="Expert groups, i.e. local nodes to start.")
@click.option("--port", default=0, help="Router port (default: 8000 when free, else a free one; `mlxmoe chat`, "
                                          "doctor and menubar find it either way).")
@click.option("--dir", "root", default=str(Path.home() / ".cache" / "mlxmoe" / "demo"), show_default=True,
              help="Where the demo keeps its bundle, key and logs.")
@click.option("--ask", metavar="QUESTION", help="Ask one question, print the answer and placement, then stop (no prompt).")
@click.option("--json", "as_json", is_flag=True, help="With --ask: print one JSON object.")
@click.option("--serve", is_flag=True, help="Start the nodes and router and keep them up (no chat here): "
                                            "chat from another terminal with `mlxmoe chat`.")
@mode_option(DEFAULT_MODE, show_default=True, help="Routing mode, the same default as `mlxmoe serve` (README: Routing modes). pin decodes on one node with no per-token traffic and is the fastest; split measured closest to the full model, onehop next.")
def demo_cmd(groups, port, root, ask, as_json, serve, mode):
    """Run mlxmoe end to end on this machine, offline.

    Uses the small MoE model bundled with mlxmoe (trained for this project):
    splits it into GROUPS expert groups, starts one node per group and a router
    on 127.0.0.1, and opens the chat. Each chat is placed on the node whose
    expert group fits it best; the status line shows where. With --mode onehop
    each MoE layer may borrow one other node's experts per token.
    Ctrl-C, closing the terminal or killing it stops everything it started.
    While it runs, `mlxmoe chat`, `doctor` and `menubar` in another terminal
    find its router without --url.

    \b
        mlxmoe demo                       # interactive chat
        mlxmoe demo --ask "def add(a, b):"  # one question, then exit
        mlxmoe demo --serve               # keep it up; chat from another terminal
    """
    from mlxmoe.ui.demo import run_demo

    if serve and ask:
        raise click.UsageError("--serve and --ask do not go together")
    sys.exit(clean_errors(run_demo, root, groups, port, ask, as_json, mode, serve=serve))
