"""Access lines, JSON logs, live session state and session TTLs: pure pieces."""

from __future__ import annotations

import json
import logging
import shlex

from click.testing import CliRunner

from mlxmoe.cluster.accesslog import JsonFormatter, format_line
from mlxmoe.cluster.api.app import health_body
from mlxmoe.cluster.router.chats import Chat, ChatIndex
from mlxmoe.cluster.sessionview import session_ref, tok_s
from mlxmoe.ui.menubar import session_counts


def test_format_line_orders_fields_drops_none_and_quotes():
    line = format_line({"extra": "a b", "status": 200, "path": "/v1/chat/completions", "session": "ref-1",
                        "node": None, "tok_s": 12.5, "method": "POST", "msg": 'say "x=1"'})
    assert line.startswith("method=POST path=/v1/chat/completions status=200 session=ref-1 tok_s=12.5 ")
    assert "node=" not in line
    parts = dict(p.split("=", 1) for p in shlex.split(line))  # a line always splits back into its fields
    assert parts["extra"] == "a b" and parts["msg"] == 'say "x=1"'
    assert format_line({}) == "" and format_line({"path": ""}) == 'path=""'


def test_json_formatter_one_object_with_fields():
    rec = logging.LogRecord("mlxmoe.access", logging.INFO, __file__, 1, "%s", ("line",), None)
    rec.access = {"path": "/health", "status": 503, "level": "not-overwritten"}
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "line" and out["path"] == "/health" and out["status"] == 503 and out["level"] == "info"
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, "a\nb", (), None)
    assert json.loads(JsonFormatter().format(plain))["msg"] == "a\nb"  # one line, whatever the message


def test_tok_s():
    assert tok_s(0, None, 5.0) is None and tok_s(1, 1.0, 5.0) is None  # the first token is TTFT, not decode
    assert tok_s(11, 1.0, 3.0) == 5.0
    assert tok_s(3, 5.0, 5.0) is None


def test_session_live_state_and_counts():
    s = Chat(id="s-1", scores={0: 1.0}, ranked=[0], margin=1.0)
    s.turns, s.tokens, s.last_used = 1, 10, 100.0
    st = s.status(now=1000.0, active_s=60)
    assert (st["generating"], st["active"], st["turns"], st["tokens"], st["tok_s"]) == (False, False, 1, 10, None)
    s.start_turn(12)
    s.turn_first = s.turn_started
    for _ in range(5):
        s.got_token()
    st = s.status(now=s.turn_first + 2.0)
    assert st["generating"] and st["active"] and st["turns"] == 2 and st["tokens"] == 17 and st["turn_tokens"] == 5
    assert st["tok_s"] == 2.0
    s.end_turn(list(range(17)))
    st = s.status()
    assert not st["generating"] and st["active"] and st["turns"] == 2 and st["tokens"] == 17
    shown = [st, {"active": False}, {"active": True, "generating": True}, {}]
    assert session_counts(shown) == {"generating": 1, "active": 3, "kept": 1}  # no flag: an older router, active


def test_api_sessions_expire_on_their_own_ttl():
    idx = ChatIndex()
    api = Chat(id="s-api", scores={}, ranked=[], margin=0, ttl=120.0, last_used=0.0)
    named = Chat(id="s-named", scores={}, ranked=[], margin=0, last_used=0.0)
    idx.add(api), idx.add(named, "my-chat")
    assert [s.id for s in idx.expired(now=121.0, ttl=1800.0)] == ["s-api"]
    assert {s.id for s in idx.expired(now=1801.0, ttl=1800.0)} == {"s-api", "s-named"}
    assert api.status()["api"] and not named.status()["api"]


def test_health_body():
    assert health_body("m", 2, 3, 5, 10.04) == {"status": "ok", "nodes_up": 2, "nodes_known": 3, "model": "m",
                                               "sessions": 5, "uptime_s": 10.0}
    assert health_body("m", 0, 0, 0, 0)["status"] == "unavailable"


def test_session_ref_hides_the_id():
    assert session_ref("s-secret").startswith("ref-") and "secret" not in session_ref("s-secret")


def test_log_options_on_serve_and_node():
    from mlxmoe.commands.node import node_cmd
    from mlxmoe.commands.serve import serve_cmd
    for cmd in (serve_cmd, node_cmd):
        help_text = CliRunner().invoke(cmd, ["--help"]).output
        assert "--log-level" in help_text and "--log-json" in help_text and "-v, --verbose" in help_text
    r = CliRunner().invoke(serve_cmd, [".", "--log-level", "loud"])
    assert r.exit_code == 2 and "--log-level" in r.output


def test_setup_logging_json(capsys):
    from mlxmoe.cluster import accesslog
    from mlxmoe.commands.options import setup_logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(False, "warning", True)
        accesslog.emit({"path": "/v1/models", "status": 200})  # info: below warning
        logging.getLogger("mlxmoe.router").warning("no node is up")
        setup_logging(False, "info", True)
        accesslog.emit({"path": "/v1/models", "status": 200})
        setup_logging(True, "error", False)  # -v wins: debug
        accesslog.emit({"path": "/status", "status": 200}, quiet=True)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert first["msg"] == "no node is up" and first["level"] == "warning"
    assert second["path"] == "/v1/models" and second["status"] == 200 and second["logger"] == "mlxmoe.access"
    assert len(lines) == 3 and "mlxmoe.access DEBUG path=/status status=200" in lines[2]
