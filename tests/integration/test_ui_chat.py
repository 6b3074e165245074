"""The chat client: network logic against the fake router, and `--once` end to end."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from mlxmoe.ui import base_url
from mlxmoe.ui.chat import ChatError, Conversation, TurnStats, status_summary, stream_chat
from ui_fake_server import MODEL, FakeRouter, sample_status

ROOT = str(Path(__file__).resolve().parents[2])


def ask(conv: Conversation, text: str, tokens: list | None = None):
    async def go():
        async with aiohttp.ClientSession() as http:
            return await conv.ask(http, text, on_token=(tokens.append if tokens is not None else lambda t: None))
    return asyncio.run(go())


def test_base_url_forms():
    assert base_url("localhost:8000") == "http://localhost:8000"
    assert base_url("http://h:1/v1/") == "http://h:1"
    assert base_url("https://h/") == "https://h"


def test_streams_tokens_and_reads_pin_headers():
    with FakeRouter(tokens=["Hi", " there", "!"]) as srv:
        conv = Conversation(srv.url, system="be brief")
        got = []
        answer, stats = ask(conv, "hello", got)
        assert got == ["Hi", " there", "!"] and answer == "Hi there!"
        assert conv.model == MODEL  # picked from /v1/models
        req = srv.requests[0]
        assert req["session"] == conv.session_id
        assert req["body"]["stream"] is True
        assert req["body"]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert (stats.node, stats.group, stats.margin) == ("mac-1", "1", 0.43)
    assert stats.scores == {"0": 0.21, "1": 0.64, "2": 0.15}
    assert stats.tokens == 3 and stats.finish_reason == "stop"
    assert 0 < stats.ttft_s <= stats.elapsed_s and stats.tokens_per_s > 0
    line = stats.line()
    assert line.startswith("node mac-1 · group 1 · margin 0.43 · ") and "tok/s" in line and "TTFT" in line


def test_conversation_keeps_history_and_session():
    with FakeRouter(tokens=["A"]) as srv:
        conv = Conversation(srv.url)
        ask(conv, "one")
        first = conv.session_id
        ask(conv, "two")
        assert [r["session"] for r in srv.requests] == [first, first]
        assert [m["content"] for m in srv.requests[1]["body"]["messages"]] == ["one", "A", "two"]
        conv.new_session()
        ask(conv, "three")
        assert srv.requests[2]["session"] != first
        assert [m["content"] for m in srv.requests[2]["body"]["messages"]] == ["three"]


def test_plain_openai_server_without_headers():
    with FakeRouter(tokens=["x", "y"], mlxmoe_headers=False, has_status=False) as srv:
        conv = Conversation(srv.url, model="whatever")
        answer, stats = ask(conv, "q")
    assert answer == "xy" and stats.node is None and stats.margin is None and stats.session is None
    assert "node" not in stats.line()
    assert stats.line().endswith("2 tokens") and "TTFT" in stats.line()


def test_usage_from_server_wins_over_chunk_count():
    # Servers may batch several tokens into one chunk; `usage` has the true count.
    with FakeRouter(tokens=["abc", "def"], completion_tokens=6) as srv:
        _, stats = ask(Conversation(srv.url), "q")
        assert srv.requests[0]["body"]["stream_options"] == {"include_usage": True}
    assert stats.tokens == 6
    assert TurnStats(ttft_s=0.1, elapsed_s=1.1, tokens=11).tokens_per_s == pytest.approx(10.0)
    assert TurnStats(ttft_s=0.1, elapsed_s=0.1, tokens=1).tokens_per_s is None


def test_server_error_is_a_clear_chat_error():
    with FakeRouter(fail_status=503) as srv:
        with pytest.raises(ChatError, match=r"503: no memory for another session \(retry after 2 s\)"):
            ask(Conversation(srv.url, model="m"), "q")


def test_connection_lost_mid_answer():
    with FakeRouter(tokens=["a", "b", "c"], drop_after=2) as srv:
        got = []
        with pytest.raises(ChatError, match=f"lost the connection to {srv.url}"):
            ask(Conversation(srv.url, model="m"), "q", got)
    assert got == ["a", "b"]


def test_unreachable_server():
    with pytest.raises(ChatError, match="cannot reach http://127.0.0.1:9"):
        ask(Conversation("http://127.0.0.1:9", model="m"), "q")


def test_status_summary_shows_peers_and_pin():
    st = sample_status()
    st["peers"][2].update(state="ignored", reason="manifest hash differs")
    sid = st["sessions"][0]["id"]  # the router's id for the sample chat
    lines = status_summary(st, sid)
    assert lines[0].startswith("fake-moe-235b · 2/3 peers up")
    assert any("mac-2: ignored (manifest hash differs) · group 2" in l for l in lines)
    assert "pinned to mac-1 (group 1), margin 0.43, scores g0=0.21, g1=0.64, g2=0.15" in lines[-1]
    assert "not placed yet" in status_summary(st, "other")[-1]
    st["sessions"][0]["margin"] = None  # a single-group cluster has no runner-up
    assert "margin ?," in status_summary(st, sid)[-1]


# --- the command, end to end --------------------------------------------------

def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MLXMOE_URL", None)
    return subprocess.run([sys.executable, "-m", "mlxmoe.cli", "chat", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_once_streams_answer_and_status_line():
    with FakeRouter(tokens=["Hello", ",", " world"]) as srv:
        r = run_cli("--url", srv.url, "--once", "hi", "--system", "be kind")
        assert srv.requests[0]["body"]["messages"][0] == {"role": "system", "content": "be kind"}
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello, world\n"
    assert "node mac-1 · group 1 · margin 0.43" in r.stderr and "tok/s" in r.stderr and "TTFT" in r.stderr


def test_once_json():
    with FakeRouter(tokens=["a", "b"]) as srv:
        r = run_cli("--url", srv.url + "/v1", "--once", "hi", "--json", "--model", "mine")
        assert srv.requests[0]["body"]["model"] == "mine"
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"] == "ab" and out["node"] == "mac-1" and out["group"] == "1" and out["tokens"] == 2
    assert out["ttft_s"] > 0 and out["scores"]["1"] == 0.64


def test_once_against_plain_server():
    with FakeRouter(tokens=["ok"], mlxmoe_headers=False, has_status=False) as srv:
        r = run_cli("--url", srv.url, "--once", "hi")
    assert r.returncode == 0 and r.stdout == "ok\n" and "node" not in r.stderr


def test_once_fails_cleanly():
    r = run_cli("--url", "http://127.0.0.1:9", "--once", "hi")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot reach") and "Traceback" not in r.stderr
    r = run_cli("--json")
    assert r.returncode == 2 and "--json works with --once only" in r.stderr


# --- the interactive prompt, through a pseudo-terminal ----------------------------

class Pty:
    def __init__(self, argv, env):
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ.update(env)
            os.execvp(argv[0], argv)

    def expect(self, needle: str, timeout: float = 20) -> str:
        import select
        import time
        buf, end = b"", time.time() + timeout
        while time.time() < end:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    buf += os.read(self.fd, 4096)
                except OSError:
                    break
                if needle.encode() in buf:
                    return buf.decode(errors="replace")
        raise AssertionError(f"waited for {needle!r}, got {buf[-1500:]!r}")

    def send(self, s: str):
        os.write(self.fd, s.encode())


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_interactive_session(tmp_path):
    with FakeRouter(tokens=["Hello"] + [" more"] * 200, token_delay=0.02) as srv:
        env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": "", "PROMPT_TOOLKIT_NO_CPR": "1",
               "PYTHONPATH": ROOT, "TERM": "xterm"}
        t = Pty([sys.executable, "-m", "mlxmoe.cli", "chat", "--url", srv.url], env)
        t.expect(">")
        t.send("line one\x1b\rline two\r")  # Esc-Enter adds a newline, Enter sends
        t.expect("Hello")
        t.send("\x03")  # Ctrl-C stops this answer, not the program
        t.expect("(stopped")
        assert srv.requests[0]["body"]["messages"] == [{"role": "user", "content": "line one\nline two"}]
        srv.tokens = ["short"]
        t.send("again\r")
        out = t.expect("tokens")
        assert "node mac-1 · group 1 · margin 0.43" in out
        # the stopped turn is not part of the transcript
        assert [m["content"] for m in srv.requests[1]["body"]["messages"]] == ["again"]
        t.send("/status\r")
        assert "3/3 peers up" in t.expect("this session")
        t.send("/new\r")
        t.expect("new conversation")
        t.send("/quit\r")
        _, code = os.waitpid(t.pid, 0)
        assert code == 0
    assert "+line two" in (tmp_path / ".config" / "mlxmoe" / "chat_history").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_interactive_spinner_typeahead_and_ctrl_c_quits(tmp_path):
    import time
    with FakeRouter(tokens=["Hello"] + [" more"] * 30, token_delay=0.1) as srv:
        env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": "", "PROMPT_TOOLKIT_NO_CPR": "1",
               "PYTHONPATH": ROOT, "TERM": "xterm"}
        t = Pty([sys.executable, "-m", "mlxmoe.cli", "chat", "--url", srv.url], env)
        t.expect(">")
        t.send("first\r")
        before = t.expect("Hello")
        assert "thinking…" in before.split("first")[-1]  # the spinner ran before the first token
        t.send("typed ahead\r")  # while the answer streams
        out = before + t.expect("tokens")
        assert "typed ahead" not in out  # not echoed into the answer
        assert "Hello" + " more" * 30 in out.replace("\r\n", "")
        time.sleep(1.0)
        assert len(srv.requests) == 1  # ... and not sent either: typed-ahead keys are dropped
        t.send("half a line")
        t.expect("half a line")
        t.send("\x03")  # Ctrl-C with text clears the line, the program stays
        time.sleep(0.5)
        t.send("\x03")  # Ctrl-C at an empty prompt quits
        _, code = os.waitpid(t.pid, 0)
        assert os.WIFEXITED(code) and os.WEXITSTATUS(code) == 0
        assert len(srv.requests) == 1
