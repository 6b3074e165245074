"""Wire format: envelope round trip, HMAC, replay window, size limits, strict
schemas (with hypothesis fuzzing of the decoder), the caller's checks of an
answer, the tensor codec, and the cluster key."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
import time

import msgpack
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxmoe import wire
from mlxmoe.cluster import keys
from mlxmoe.wire import WireError

pytestmark = pytest.mark.timeout(60)
KEY = b"x" * 32


DST, EP = "node-a", "e0"


def _req(op="generate", body=None, key=KEY, **kw):
    body = body if body is not None else {"session": "s1", "prompt": [1, 2, 3], "params": {"max_tokens": 4}}
    return wire.encode_request(key, op, body, dst=kw.pop("dst", DST), epoch=kw.pop("epoch", EP), **kw)


def _dec(data, headers, op="generate", guard=None, dst=DST, epoch=EP):
    return wire.decode_request(KEY, headers, data, op, dst, epoch, guard)


def _signed_preamble(pre: dict, key=KEY) -> dict:
    raw = msgpack.packb(pre, use_bin_type=True)
    return {wire.PREAMBLE_HEADER: base64.urlsafe_b64encode(raw).decode(), wire.AUTH_HEADER: wire.sign(key, b"req:" + raw)}


def _preamble(data=b"\x80", **change) -> dict:
    pre = {"v": wire.PROTOCOL_VERSION, "op": "info", "ts": time.time(), "nonce": os.urandom(8).hex(), "dst": DST,
           "ep": EP, "len": len(data), "sha": hashlib.sha256(data).digest(), "src": "t"}
    pre.update(change)
    return pre


def _raises(status, fn, *a, field=None, code=None):
    with pytest.raises(WireError) as ei:
        fn(*a)
    assert ei.value.status == status, ei.value.message
    if field:
        assert field in ei.value.message and ei.value.field == field
    if code:
        assert ei.value.code == code
    return ei.value


def test_round_trip():
    data, headers = _req(mh="abc", src="router@x")
    r = _dec(data, headers)
    assert r.op == "generate" and r.mh == "abc" and r.src == "router@x"
    assert r.body == {"session": "s1", "prompt": [1, 2, 3], "params": {"max_tokens": 4}}
    assert abs(r.ts - time.time()) < 5 and len(r.nonce) == 32
    assert len(headers[wire.PREAMBLE_HEADER]) < 400  # a few hundred bytes of headers carry the proof


def test_hmac_required_and_checked():
    data, headers = _req()
    e = _raises(401, _dec, data, {})
    assert e.message == "unauthorized"  # nothing else for a sender without the key
    _raises(401, wire.decode_request, b"y" * 32, headers, data, "generate", DST, EP)
    pre = bytearray(base64.urlsafe_b64decode(headers[wire.PREAMBLE_HEADER]))
    pre[-1] ^= 1
    _raises(401, _dec, data, {**headers, wire.PREAMBLE_HEADER: base64.urlsafe_b64encode(bytes(pre)).decode()})
    for sig in ("zz", "é" * 64, None):
        _raises(401, _dec, data, {**headers, wire.AUTH_HEADER: sig})
    _raises(401, _dec, data, {**headers, wire.PREAMBLE_HEADER: "é" * 10})
    _raises(401, _dec, data, {**headers, wire.PREAMBLE_HEADER: "A" * (wire.MAX_PREAMBLE_CHARS + 1)})
    tampered = bytearray(data)
    tampered[-1] ^= 1
    _raises(401, _dec, bytes(tampered), headers, code="body_digest")  # the body is covered through its sha256


def test_unsigned_garbage_gets_401_not_400():
    _raises(401, _dec, b"\xc1garbage", {wire.PREAMBLE_HEADER: "garbage", wire.AUTH_HEADER: "0" * 64}, "info")


def test_replay_and_stale():
    guard = wire.ReplayGuard(window_s=30)
    data, headers = _req()
    _dec(data, headers, "generate", guard)
    _raises(401, _dec, data, headers, "generate", guard, field="nonce")
    for ts in (time.time() - 120, time.time() + 120, float("nan"), float("inf"), float("-inf")):
        data, headers = _req(ts=ts)
        e = _raises(401, _dec, data, headers, "generate", guard, field="ts")
        assert "clock" in e.message


def test_destination_and_epoch_are_bound():
    """A request signed for one node's run is refused by another node and by the same node after a restart."""
    data, headers = _req()
    _raises(401, _dec, data, headers, "generate", None, "node-b", EP, field="dst", code="destination")
    _raises(401, _dec, data, headers, "generate", None, DST, "e1", field="ep", code="epoch")
    assert {"destination", "epoch"} == set(wire.REHELLO_CODES)
    data, headers = _req(dst="*", epoch="*")  # no wildcard
    _raises(401, _dec, data, headers, code="destination")


def test_hello_answer():
    assert wire.open_hello(wire.hello_response("n", "e")) == ("n", "e")
    for bad in (b"\xc1", wire.pack({"node": 1, "epoch": "e"}), wire.pack([1])):
        with pytest.raises(WireError):
            wire.open_hello(bad)


def test_size_limits_before_auth():
    _raises(413, wire.open_preamble, KEY, {}, "generate", DST, EP, None, wire.DEFAULT_MAX_BYTES + 1)
    assert wire.max_bytes("import_session") == 256 * wire.MiB
    state = {"state": {"id": "s", "tokens": [1], "manifest": "m",
                       "caches": [{"type": "KVCache", "state": b"\x00" * (wire.DEFAULT_MAX_BYTES + 10)}]}}
    data, headers = _req("import_session", state)
    assert _dec(data, headers, "import_session").op == "import_session"
    _raises(413, _dec, data, headers, "generate")
    data = b"\x80"
    pre = _preamble(data, len=wire.DEFAULT_MAX_BYTES + 1)  # signed, but more than the op allows
    _raises(400, _dec, data, _signed_preamble(pre), "info", field="len")


def test_content_length_must_be_the_signed_length():
    data, headers = _req("info", {})
    _raises(400, wire.open_preamble, KEY, headers, "info", DST, EP, None, None, field="len")  # chunked
    _raises(400, wire.open_preamble, KEY, headers, "info", DST, EP, None, len(data) + 1, field="len")
    _raises(401, wire.open_body, wire.open_preamble(KEY, headers, "info", DST, EP, None, len(data)), b"\x81")


def test_version_op_and_preamble_checks():
    for change, status, field in [({"v": 1}, 426, "v"), ({"op": "nope"}, 400, "op"), ({"op": "generate"}, 400, "op"),
                                  ({"extra": 1}, 400, "preamble.extra"), ({"nonce": "short"}, 400, "preamble.nonce"),
                                  ({"ts": "now"}, 400, "preamble.ts"), ({"sha": b"x"}, 400, "len"),
                                  ({"len": -1}, 400, "len"), ({"dst": 5}, 400, "preamble.dst")]:
        _raises(status, _dec, b"\x80", _signed_preamble(_preamble(**change)), "info", field=field)
    for pre in ([1, 2], "x"):
        _raises(400, _dec, b"\x80", _signed_preamble(pre), "info")
    raw = msgpack.packb(_preamble()) + b"\x00"  # trailing bytes
    h = {wire.PREAMBLE_HEADER: base64.urlsafe_b64encode(raw).decode(), wire.AUTH_HEADER: wire.sign(KEY, b"req:" + raw)}
    _raises(400, _dec, b"\x80", h, "info")
    data = msgpack.packb({}) + b"\x00"  # a body with trailing bytes
    _raises(400, _dec, data, _signed_preamble(_preamble(data)), "info")


@pytest.mark.parametrize("body,field", [
    ({"prompt": [1], "params": {"max_tokens": 1}}, "body.session"),
    ({"session": "s", "prompt": [1], "params": {"max_tokens": 1}, "x": 1}, "body.x"),
    ({"session": 5, "prompt": [1], "params": {"max_tokens": 1}}, "body.session"),
    ({"session": "s", "prompt": [1, -1], "params": {"max_tokens": 1}}, "body.prompt"),
    ({"session": "s", "prompt": [1, True], "params": {"max_tokens": 1}}, "body.prompt"),
    ({"session": "s", "prompt": "abc", "params": {"max_tokens": 1}}, "body.prompt"),
    ({"session": "s", "prompt": [1], "params": {}}, "body.params.max_tokens"),
    ({"session": "s", "prompt": [1], "params": {"max_tokens": 1.5}}, "body.params.max_tokens"),
    ({"session": "s", "prompt": [1], "params": {"max_tokens": 1, "stop": [1]}}, "body.params.stop"),
    ({"session": "s", "prompt": [1], "params": {"max_tokens": 1, "top_p": 0}}, "body.params.top_p"),
    ({"session": "s", "prompt": [1], "params": {"max_tokens": -1}}, "body.params.max_tokens"),
    ({"session": "", "prompt": [1], "params": {"max_tokens": 1}}, "body.session"),
])
def test_schema_errors_name_the_field(body, field):
    data, headers = _req("generate", body)
    _raises(400, _dec, data, headers, "generate", field=field)


@pytest.mark.parametrize("state,field", [
    ({"type": "KVCache"}, "body.state.type"),
    ({"tokens": [1], "manifest": "m", "caches": []}, "body.state.id"),
    ({"id": "s", "tokens": [1], "manifest": "m", "caches": [{"state": 1}]}, "body.state.caches.0.type"),
    ({"id": "s", "tokens": [1], "manifest": "m", "caches": [1]}, "body.state.caches"),
    ({"id": "s", "tokens": [-1], "manifest": "m", "caches": []}, "body.state.tokens"),
    ({"id": "", "tokens": [], "manifest": "m", "caches": []}, "body.state.id"),
])
def test_junk_import_state_names_the_field(state, field):
    data, headers = _req("import_session", {"state": state})
    _raises(400, _dec, data, headers, "import_session", field=field)


def test_ext_types_refused():
    _raises(400, _dec, b"\x80", _signed_preamble(_preamble(mh=msgpack.ExtType(5, b"x"))), "info")
    data = msgpack.packb({"held": [msgpack.ExtType(5, b"x")]})
    _raises(400, _dec, data, _signed_preamble(_preamble(data)), "info")


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(wire.OPS + ("bogus",)), body=msgpack_values, extra=st.dictionaries(
    st.sampled_from(["v", "op", "ts", "nonce", "mh", "zz"]), msgpack_values, max_size=3))
def test_fuzz_decoder_only_wire_errors(op, body, extra):
    data = msgpack.packb(body, use_bin_type=True)
    pre = _preamble(data, op=op)
    pre.update({k if k != "zz" else "zz": v for k, v in extra.items()})
    try:
        r = _dec(data, _signed_preamble(pre), op)
    except WireError as e:
        assert 400 <= e.status < 500 and e.message
    else:
        assert r.op in wire.OPS and isinstance(r.body, dict)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), op=st.sampled_from(wire.OPS))
def test_fuzz_raw_bytes_signed(data, op):
    try:
        _dec(data, _signed_preamble(_preamble(data, op=op)), op)
    except WireError as e:
        assert 400 <= e.status < 500


# ---------------------------------------------------------------- caller side

def test_answers_are_opened_only_with_the_nonce_and_key_they_were_signed_for():
    data = wire.ok_response({"y": 1})
    sig = wire.response_mac(KEY, "n1234567", data)
    assert wire.open_response(KEY, "n1234567", data, sig) == {"y": 1}
    for key, nonce, d, s in [(b"y" * 32, "n1234567", data, sig), (KEY, "other-nonce", data, sig),
                             (KEY, "n1234567", data + b"\x00", sig), (KEY, "n1234567", data, None)]:
        with pytest.raises(WireError) as ei:
            wire.open_response(key, nonce, d, s)
        assert ei.value.code == "unauthenticated"
    for bad in (b"\xc1", wire.pack([1]), wire.error_response({"code": "x"})):  # signed, but not a 200 answer
        with pytest.raises(WireError) as ei:
            wire.open_response(KEY, "n1234567", bad, wire.response_mac(KEY, "n1234567", bad))
        assert ei.value.code == "bad_response"
    assert wire.verify_stream(KEY, "n1234567", wire.stream_mac(KEY, "n1234567"))
    assert not wire.verify_stream(KEY, "n7654321", wire.stream_mac(KEY, "n1234567"))


def test_refusal_reads_an_error_answer_or_nothing():
    err = WireError(400, "schema", "field 'body.x': required", "body.x")
    assert wire.refusal(wire.error_response(err)) == err.to_dict()
    assert wire.refusal(b"\xc1") == {} and wire.refusal(wire.pack({"error": "text"})) == {}


def test_stream_frames_split_anywhere_come_out_whole():
    frames = [{"t": "tok", "token": i} for i in range(3)] + [{"t": "end"}]
    signer = wire.StreamSigner(KEY, "n1234567")
    data = b"".join(signer.frame(f) for f in frames)
    u, v, got = wire.stream_unpacker(), wire.StreamVerifier(KEY, "n1234567"), []
    for i in range(0, len(data), 3):
        u.feed(data[i:i + 3])
        got += [v.open(item) for item in u]
    assert got == frames


def _items(frames, nonce="n1234567", key=KEY):
    signer = wire.StreamSigner(key, nonce)
    return [wire.unpack(signer.frame(f)) for f in frames]


def test_stream_frames_cannot_be_altered_dropped_reordered_or_spliced():
    frames = [{"t": "tok", "token": i, "text": str(i)} for i in range(4)] + [{"t": "end"}]
    items = _items(frames)
    altered = [list(i) for i in items]
    altered[1][0] = wire.pack({"t": "tok", "token": 9, "text": "9"})
    foreign = _items(frames, nonce="n7654321")
    for bad, at in [(altered, 1), (items[:1] + items[2:], 1), ([items[1], items[0]] + items[2:], 0),
                    (items[:2] + foreign[2:], 2), (_items(frames, key=b"y" * 32), 0),
                    (items[:1] + [[items[1][0]]], 1), (items[:1] + [None], 1)]:
        v = wire.StreamVerifier(KEY, "n1234567")
        for item in bad[:at]:
            v.open(item)
        with pytest.raises(WireError) as ei:
            v.open(bad[at])
        assert ei.value.status == 0 and ei.value.code in ("unauthenticated", "bad_response")


# ---------------------------------------------------------------- tensors

@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "uint8", "uint32", "int32", "int64", "bool_"])
def test_tensor_codec_is_exact(dtype):
    import mlx.core as mx
    import numpy as np

    a = (mx.random.normal((3, 5), key=mx.random.key(1)) * 1000).astype(getattr(mx, dtype))
    t = wire.encode_tensor(a)
    assert t["shape"] == [3, 5] and len(t["data"]) == a.nbytes
    b = wire.decode_tensor(wire.unpack(wire.pack(t)))
    assert b.dtype == a.dtype and b.shape == a.shape
    raw = (lambda x: x.view(mx.uint16)) if dtype == "bfloat16" else (lambda x: x)
    assert np.array_equal(np.array(raw(b)), np.array(raw(a)))  # bit for bit


def test_activations_travel_in_the_schemas_dtypes():
    import mlx.core as mx

    for dt, name in ((mx.bfloat16, "bf16"), (mx.float16, "f16"), (mx.float32, "f32")):
        t = wire.encode_tensor(mx.ones((1, 4, 8), dt))
        assert t["dtype"] == name and wire.check_tensor(t, "body.x") == (1, 4, 8)
    with pytest.raises(WireError, match="'f64'"):
        wire.decode_tensor({"dtype": "f64", "shape": [1], "data": b"\x00" * 8})


def test_the_wire_loads_no_mlx_until_a_tensor_travels():
    code = ("import sys; from mlxmoe import wire; import mlxmoe.cluster.client, mlxmoe.cluster.router; "
            "assert 'mlx.core' not in sys.modules and 'numpy' not in sys.modules, 'loaded'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- cluster key

def test_key_create_load_and_no_overwrite(tmp_path):
    p = tmp_path / "cfg" / "cluster.key"
    keys.create_key(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and keys.is_private(p)
    k = keys.load_key(p)
    assert len(k) == 32
    with pytest.raises(FileExistsError, match="--force"):
        keys.create_key(p)
    keys.create_key(p, force=True)
    assert keys.load_key(p) != k


def test_key_errors(tmp_path, monkeypatch):
    with pytest.raises(keys.ClusterKeyError, match="mlxmoe init"):
        keys.load_key(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    with pytest.raises(keys.ClusterKeyError, match="hex"):
        keys.load_key(bad)
    bad.write_text("abcd")
    with pytest.raises(keys.ClusterKeyError, match="too short"):
        keys.load_key(bad)
    monkeypatch.setenv(keys.ENV_VAR, str(tmp_path / "env.key"))
    assert keys.default_path() == tmp_path / "env.key"


def test_init_command(tmp_path, monkeypatch):
    from mlxmoe.cli import main
    monkeypatch.setenv(keys.ENV_VAR, str(tmp_path / "c.key"))
    r = CliRunner().invoke(main, ["init"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.key").exists() and "scp" in r.output
    r = CliRunner().invoke(main, ["init"])
    assert r.exit_code != 0 and "--force" in r.output
    other = tmp_path / "other.key"
    r = CliRunner().invoke(main, ["init", "--path", str(other)])
    assert r.exit_code == 0 and other.exists()
    r = CliRunner().invoke(main, ["init", "--force"])
    assert r.exit_code == 0
