"""Pure validation of the router's API (docs/SECURITY.md): each check names the field."""

from __future__ import annotations

import click
import pytest

from mlxmoe.cluster.api import openai as oa
from mlxmoe.cluster.router.chats import Chat as Session, ChatIndex as SessionIndex
from mlxmoe.cluster.sessionview import session_ref
from mlxmoe.commands.options import api_keys, check_bind, is_loopback


def _err(fn, *a):
    with pytest.raises(oa.ApiError) as e:
        fn(*a)
    return e.value


def test_check_messages_fit():
    oa.check_messages_fit([{"role": "user", "content": "x" * 100}] * 10, 2048)
    assert _err(oa.check_messages_fit, [{"role": "user", "content": ""}] * 2048, 2048).code == "context_length_exceeded"
    assert _err(oa.check_messages_fit, [{"role": "user", "content": "x" * 70000}] * 2, 2048).param == "messages"
    oa.check_messages_fit([{"role": "user", "content": "x"}] * 5000, None)


def test_check_tokens():
    oa.check_tokens([0, 4095], 4096, 2048, "prompt")
    assert _err(oa.check_tokens, [1, 4096], 4096, 2048, "prompt").param == "prompt"
    assert _err(oa.check_tokens, [-1], 4096, None, "prompt").code == "invalid_value"
    assert _err(oa.check_tokens, [2 ** 31], None, None, "prompt").code == "invalid_value"
    e = _err(oa.check_tokens, [1] * 2048, 4096, 2048, "messages")
    assert (e.param, e.code, e.status) == ("messages", "context_length_exceeded", 400)
    oa.check_tokens([1] * 2047, 4096, 2048, "prompt")
    oa.check_tokens([1] * 100000, None, None, "prompt")  # nothing known: nothing refused here


def test_check_chars_and_numbers():
    oa.check_chars(2048 * oa.MAX_CHARS_PER_TOKEN, 2048, "prompt")
    assert _err(oa.check_chars, 2048 * oa.MAX_CHARS_PER_TOKEN + 1, 2048, "prompt").code == "context_length_exceeded"
    for v in (float("nan"), float("inf"), 10 ** 400):
        assert _err(oa.number, {"temperature": v}, "temperature", 0.0).param == "temperature"
    assert oa.number({}, "top_p", 1.0) == 1.0 and oa.number({"top_p": 1}, "top_p", 0.5) == 1.0
    assert _err(oa.text, "a\ud800", "stop").param == "stop" and oa.text("ü€😀", "x") == "ü€😀"


def test_gen_params_seed_and_roles():
    assert oa.gen_params({"seed": 2 ** 64 - 1}).seed == 2 ** 64 - 1
    for seed in (2 ** 64, -1, 10 ** 30):
        e = _err(oa.gen_params, {"seed": seed})
        assert e.param == "seed" and "binding" not in e.message
    for role in ({"a": 1}, ["user"], 3, None):
        assert _err(oa.parse_messages, {"messages": [{"role": role, "content": "x"}]}).param == "messages[0].role"


def test_check_model():
    oa.check_model({}, ("org/m", "m"))
    oa.check_model({"model": "m"}, ("org/m", "m"))
    e = _err(oa.check_model, {"model": "gpt-4"}, ("org/m", "m"))
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    assert _err(oa.check_model, {"model": 3}, ("m",)).status == 400


def test_api_keys_and_bind(tmp_path):
    assert api_keys(None) == [] and api_keys("sekrit") == ["sekrit"]
    f = tmp_path / "keys"
    f.write_text("# clients\nalice\n\n bob \n")
    assert api_keys(str(f)) == ["alice", "bob"]
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(click.ClickException):
        api_keys(str(tmp_path / "empty"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("mac.local")
    check_bind("127.0.0.1", [])
    check_bind("0.0.0.0", ["k"])
    with pytest.raises(click.ClickException, match="API key"):
        check_bind("0.0.0.0", [])


def test_serve_refuses_an_open_host_without_a_key(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlxmoe.commands.serve import serve_cmd
    monkeypatch.delenv("MLXMOE_API_KEY", raising=False)
    r = CliRunner().invoke(serve_cmd, [str(tmp_path), "--host", "0.0.0.0"])
    assert r.exit_code != 0 and "API key" in r.output and "--api-key" in r.output


def test_session_index_is_per_owner():
    idx = SessionIndex()
    a = Session(id="s-a", scores={}, ranked=[], margin=0.0, owner="alice")
    idx.add(a, "conv")
    assert idx.find("s-a", None, "alice") is a and idx.find("conv", None, "alice") is a
    assert idx.find("s-a", None, "bob") is None and idx.find("conv", None, "bob") is None
    assert idx.find("s-a", None) is None  # nor anonymous
    msgs = [{"role": "user", "content": "q"}]
    idx.remember_turn(a, msgs, "r")
    nxt = msgs + [{"role": "assistant", "content": "r"}, {"role": "user", "content": "q2"}]
    assert idx.find(None, nxt, "alice") is a and idx.find(None, nxt, "bob") is None
    assert session_ref("s-a") == a.ref != "s-a" and idx.find(a.ref, None, "alice") is None
