"""`mlxmoe chat`: a terminal client for any OpenAI-compatible server.

The network part (`stream_chat`, `pick_model`, `Conversation`) is plain async
code with no terminal in sight, so tests drive it directly. The mlxmoe
router adds X-MLXMoE-* headers (where the session is pinned) and `/status`;
against LM Studio, Ollama or anything else without them the client still
works and the status line simply shows timing only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

from mlxmoe.errors import MlxMoeError
from mlxmoe.ui import base_url, fetch_status


# No total limit (answers can be long); a server silent this long is stuck.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=TIMEOUT)


class ChatError(MlxMoeError):
    """The server refused or could not be reached; the message says which."""

    status, code = 502, "router_failed"  # the client's view: the server upstream of it failed it


@dataclass
class TurnStats:
    """What one answer cost and where it ran (None: the server did not say)."""

    session: str | None = None
    node: str | None = None
    group: str | None = None
    margin: float | None = None
    scores: dict | None = None
    ttft_s: float | None = None  # request sent -> first content token
    elapsed_s: float = 0.0
    tokens: int = 0  # from `usage` when the server sends it, else streamed chunks
    finish_reason: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        # Decode rate: tokens after the first over the time after the first.
        if self.ttft_s is None or self.tokens < 2 or self.elapsed_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.elapsed_s - self.ttft_s)

    def line(self) -> str:
        parts = []
        if self.node is not None:
            parts.append(f"node {self.node}")
        if self.group is not None:
            parts.append(f"group {self.group}")
        if self.margin is not None:
            parts.append(f"margin {self.margin:.2f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        parts.append(f"{self.tokens} tokens")
        return " · ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _headers_stats(headers) -> TurnStats:
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    scores = headers.get("X-MLXMoE-Scores")
    try:
        scores = json.loads(scores) if scores else None
    except ValueError:
        scores = None
    return TurnStats(session=headers.get("X-MLXMoE-Session"), node=headers.get("X-MLXMoE-Node"),
                     group=headers.get("X-MLXMoE-Group"), margin=num(headers.get("X-MLXMoE-Margin")),
                     scores=scores if isinstance(scores, dict) else None)


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    body = await resp.text()
    try:
        msg = json.loads(body)["error"]
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except (ValueError, KeyError, TypeError):
        msg = body.strip()[:300] or resp.reason
    retry = resp.headers.get("Retry-After")
    return f"server answered {resp.status}: {msg}" + (f" (retry after {retry} s)" if retry else "")


async def stream_chat(http: aiohttp.ClientSession, url: str, messages: list[dict], *, model: str,
                      session_id: str | None = None, on_token: Callable[[str], None] = lambda t: None,
                      api_key: str | None = None, max_tokens: int | None = None) -> tuple[str, TurnStats]:
    """POST one streamed chat completion; call `on_token` for every piece of
    text as it arrives; return the full answer and its stats."""
    headers = {"Accept": "text/event-stream"}
    if session_id:
        headers["X-Session-Id"] = session_id
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if max_tokens:
        body["max_tokens"] = max_tokens
    start = time.monotonic()
    pieces: list[str] = []
    try:
        async with http.post(base_url(url) + "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                raise ChatError(await _error_text(resp))
            stats = _headers_stats(resp.headers)
            chunks = 0
            async for raw in resp.content:  # one SSE line at a time
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, `event:` and `: keep-alive` comments
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ChatError(f"server sent a malformed stream event: {data[:200]!r}") from None
                if "error" in event:
                    err = event["error"]
                    raise ChatError(f"server error mid-stream: {err.get('message', err) if isinstance(err, dict) else err}")
                if event.get("usage"):
                    stats.tokens = event["usage"].get("completion_tokens") or stats.tokens
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if stats.ttft_s is None:
                            stats.ttft_s = time.monotonic() - start
                        chunks += 1
                        pieces.append(text)
                        on_token(text)
                    if choice.get("finish_reason"):
                        stats.finish_reason = choice["finish_reason"]
    except aiohttp.ClientError as e:
        where = "lost the connection to" if pieces else "cannot reach"
        raise ChatError(f"{where} {base_url(url)}: {e}") from None
    except asyncio.TimeoutError:
        raise ChatError(f"{base_url(url)} sent nothing for {TIMEOUT.sock_read:.0f} s; giving up") from None
    stats.elapsed_s = time.monotonic() - start
    stats.tokens = stats.tokens or chunks
    return "".join(pieces), stats


async def pick_model(http: aiohttp.ClientSession, url: str, api_key: str | None = None) -> str:
    """The first model the server lists; the router serves exactly one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with http.get(base_url(url) + "/v1/models", headers=headers) as resp:
            if resp.status != 200:
                raise ChatError(f"cannot list models at {base_url(url)}/v1/models: " + await _error_text(resp))
            data = (await resp.json(content_type=None)).get("data") or []
    except aiohttp.ClientError as e:
        raise ChatError(f"cannot reach {base_url(url)}: {e}") from None
    except (ValueError, AttributeError):
        raise ChatError(f"{base_url(url)}/v1/models did not return an OpenAI model list") from None
    if not data:
        raise ChatError(f"{base_url(url)} serves no model; pass --model")
    return data[0]["id"]


@dataclass
class Conversation:
    """The transcript and the session id that pins it to one node."""

    url: str
    model: str | None = None
    system: str | None = None
    api_key: str | None = None
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[dict] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history + [{"role": "user", "content": user_text}]

    def new_session(self) -> None:
        self.session_id, self.history = uuid.uuid4().hex, []

    async def ask(self, http: aiohttp.ClientSession, text: str, on_token=lambda t: None) -> tuple[str, TurnStats]:
        if self.model is None:
            self.model = await pick_model(http, self.url, self.api_key)
        answer, stats = await stream_chat(http, self.url, self.messages(text), model=self.model,
                                          session_id=self.session_id, on_token=on_token, api_key=self.api_key)
        if stats.session:  # the router may rename the session; follow it
            self.session_id = stats.session
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer, stats


def status_summary(status: dict, session_id: str | None) -> list[str]:
    """Plain lines for `/status`: the cluster, its peers, and this session's pin."""
    peers = status.get("peers") or []
    up = sum(p.get("state") == "up" for p in peers)
    lines = [f"{status.get('model', '?')} · {up}/{len(peers)} peers up · manifest {str(status.get('manifest_hash', '?'))[:12]}"]
    for p in peers:
        groups = ",".join(str(g) for g in p.get("groups") or []) or "-"
        reason = f" ({p['reason']})" if p.get("reason") else ""
        lines.append(f"  {p.get('name', '?')}: {p.get('state', '?')}{reason} · group {groups} · "
                     f"{p.get('active_sessions', '?')} sessions")
    ref = "ref-" + hashlib.sha256(session_id.encode()).hexdigest()[:16] if session_id else None  # /status shows ids as refs
    mine = next((s for s in status.get("sessions") or [] if s.get("id") in (session_id, ref)), None)
    if mine:
        scores = ", ".join(f"g{g}={v:.2f}" for g, v in sorted((mine.get("scores") or {}).items(), key=lambda kv: int(kv[0])))
        margin = mine.get("margin")
        margin = f"{margin:.2f}" if isinstance(margin, (int, float)) else "?"
        lines.append(f"this session: pinned to {mine.get('node')} (group {mine.get('group')}), "
                     f"margin {margin}, scores {scores}, {mine.get('turns')} turns")
    else:
        lines.append("this session: not placed yet (it is placed on its first message)")
    return lines


# --- command-line front ends -------------------------------------------------

def run_once(url: str, question: str, *, model: str | None, system: str | None, as_json: bool,
             api_key: str | None = None) -> int:
    """Ask one question; stream the answer to stdout (or print one JSON object)."""
    conv = Conversation(url, model=model, system=system, api_key=api_key)

    def emit(t: str) -> None:
        sys.stdout.write(t)
        sys.stdout.flush()

    async def go():
        async with client_session() as http:
            return await conv.ask(http, question, on_token=(lambda t: None) if as_json else emit)

    try:
        answer, stats = asyncio.run(go())
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"answer": answer, "model": conv.model, **stats.to_dict()}))
    else:
        sys.stdout.write("\n")
        # The status line goes to stderr so stdout holds only the answer.
        print(f"[{stats.line()}]", file=sys.stderr)
    return 0


HELP = """Enter sends · Esc Enter (or Alt-Enter) adds a new line · Ctrl-C stops an answer, clears a line,
  or quits at an empty prompt · Ctrl-D quits · keys typed while an answer streams are dropped
  /new          start a new conversation (new session: it may be placed on another Mac)
  /system TEXT  set the system prompt (empty: none) and start a new conversation
  /status       show the cluster's peers and where this conversation is pinned
  /help         this text
  /quit         leave"""


def history_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "mlxmoe" / "chat_history"


SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Spinner:
    """An animated line on stderr until the first token (or the end)."""

    def __init__(self, out=None, label: str = "thinking"):
        self.out, self.label = out or sys.stderr, label
        self.task = asyncio.ensure_future(self._spin())

    async def _spin(self) -> None:
        for i in range(10**9):
            self.out.write(f"\r{SPINNER[i % len(SPINNER)]} {self.label}…")
            self.out.flush()
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        """Cancel and erase it now (idempotent), before the answer is printed."""
        if not self.task.done():
            self.task.cancel()
            self.out.write("\r\x1b[K")  # carriage return + erase line: the answer starts clean
            self.out.flush()


class QuietInput:
    """While an answer streams nobody reads the keyboard: turn the terminal's
    echo off so typed keys do not land inside the answer, and drop them at the
    end so they are not sent as the next message (docs/ARCHITECTURE.md, ui).
    Ctrl-C still signals (ISIG stays on). A no-op without a terminal."""

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.saved = None

    def __enter__(self):
        try:
            import termios
            self.saved = termios.tcgetattr(self.fd)
            quiet = termios.tcgetattr(self.fd)
            quiet[3] &= ~(termios.ECHO | termios.ICANON)
            termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError):
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios
            try:
                termios.tcflush(self.fd, termios.TCIFLUSH)  # the typed-ahead keys go
                termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
            except (OSError, termios.error):
                pass


def run_interactive(url: str, *, model: str | None, system: str | None, api_key: str | None = None) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings
    from rich.console import Console

    console = Console(highlight=False)
    conv = Conversation(url, model=model, system=system, api_key=api_key)
    keys = KeyBindings()

    @keys.add("enter")
    def _send(event):
        event.current_buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event):
        buf = event.current_buffer
        if buf.text:
            buf.reset()  # Ctrl-C on a half-typed message clears it, as shells do
        else:
            event.app.exit(exception=EOFError())  # at an empty prompt: quit

    path = history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(path)), multiline=True, key_bindings=keys)

    async def loop():
        async with client_session() as http:
            console.print(f"[dim]mlxmoe chat → {base_url(url)}  (/help for commands)[/dim]")
            while True:
                try:
                    text = (await prompt.prompt_async("> ", prompt_continuation="… ")).strip()
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    return
                if not text:
                    continue
                if text.startswith("/"):
                    cmd, _, arg = text.partition(" ")
                    if cmd in ("/quit", "/exit"):
                        return
                    elif cmd == "/help":
                        console.print(HELP, markup=False)
                    elif cmd == "/new":
                        conv.new_session()
                        console.print("[dim]new conversation[/dim]")
                    elif cmd == "/system":
                        conv.system = arg.strip() or None
                        conv.new_session()
                        console.print(f"[dim]system prompt {'set' if conv.system else 'cleared'}; new conversation[/dim]")
                    elif cmd == "/status":
                        try:
                            st = await asyncio.to_thread(fetch_status, url)
                            console.print("\n".join(status_summary(st, conv.session_id)), markup=False)
                        except (OSError, ValueError) as e:
                            console.print(f"[yellow]no /status at {base_url(url)} ({e}); "
                                          "only mlxmoe routers have one[/yellow]")
                    else:
                        console.print(f"[yellow]unknown command {cmd}; /help lists them[/yellow]")
                    continue
                await answer(http, text)

    async def answer(http, text: str) -> None:
        spinner = Spinner()

        def show(t: str) -> None:
            spinner.stop()
            console.print(t, end="", markup=False)

        task = asyncio.ensure_future(conv.ask(http, text, on_token=show))
        # Ctrl-C while streaming stops this answer only (the prompt handles its own Ctrl-C).
        aloop = asyncio.get_running_loop()
        aloop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            with QuietInput():
                try:
                    _, stats = await task
                finally:
                    spinner.stop()
            console.print()
            console.print(f"[dim]{stats.line()}[/dim]")
        except ChatError as e:
            console.print(f"\n[red]{e}[/red]")
        except asyncio.CancelledError:
            console.print("\n[dim](stopped; this turn is not kept)[/dim]")
        finally:
            aloop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(loop())
    except KeyboardInterrupt:
        pass
    return 0
