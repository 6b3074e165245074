"""`mlxmoe chat`: chat in the terminal."""

from __future__ import annotations

import sys

import click

from mlxmoe.commands.options import url_option


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
    from mlxmoe.ui import base_url, chat

    url = base_url(url)  # once: no --url / $MLXMOE_URL means a running demo's router, else the default
    if once is not None:
        sys.exit(chat.run_once(url, once, model=model, system=system, as_json=as_json, api_key=api_key))
    if as_json:
        raise click.UsageError("--json works with --once only")
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal on stdin: use --once \"question\" in scripts")
    sys.exit(chat.run_interactive(url, model=model, system=system, api_key=api_key))
