"""Wire format: envelope round trip, HMAC, replay window, size limits, strict
schemas (with hypothesis fuzzing of the decoder), the caller's checks of an
answer, the tensor codec, and the cluster key."""

from __future__ import annotations

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


def _req(op="generate", body=None, key=KEY, **kw):
    body = body if body is not None else {"session": "s1", "prompt": [1, 2, 3], "params": {"max_tokens": 4}}
    data, headers = wire.encode_request(key, op, body, **kw)
    return data, headers[wire.AUTH_HEADER]


def _raises(status, fn, *a, field=None):
    with pytest.raises(WireError) as ei:
        fn(*a)
    assert ei.value.status == status, ei.value.message
    if field:
        assert field in ei.value.message and ei.value.field == field
    return ei.value


def test_round_trip():
    data, sig = _req(mh="abc")
    r = wire.decode_request(KEY, data, sig, "generate")
    assert r.op == "generate" and r.mh == "abc"
    assert r.body == {"session": "s1", "prompt": [1, 2, 3], "params": {"max_tokens": 4}}
    assert abs(r.ts - time.time()) < 5 and len(r.nonce) == 32


def test_hmac_required_and_checked():
    data, sig = _req()
    e = _raises(401, wire.decode_request, KEY, data, None, "generate")
    assert e.message == "unauthorized"  # nothing else for a sender without the key
    _raises(401, wire.decode_request, b"y" * 32, data, sig, "generate")
    tampered = bytearray(data)
    tampered[-1] ^= 1
    _raises(401, wire.decode_request, KEY, bytes(tampered), sig, "generate")
    _raises(401, wire.decode_request, KEY, data, "zz", "generate")
    _raises(401, wire.decode_request, KEY, data, "é" * 64, "generate")


def test_unsigned_garbage_gets_401_not_400():
    _raises(401, wire.decode_request, KEY, b"\xc1garbage", None, "info")


def test_replay_and_stale():
    guard = wire.ReplayGuard(window_s=30)
    data, sig = _req()
    wire.decode_request(KEY, data, sig, "generate", guard)
    _raises(401, wire.decode_request, KEY, data, sig, "generate", guard, field="nonce")
    data, sig = _req(ts=time.time() - 120)
    e = _raises(401, wire.decode_request, KEY, data, sig, "generate", guard, field="ts")
    assert "clock" in e.message
    data, sig = _req(ts=time.time() + 120)
    _raises(401, wire.decode_request, KEY, data, sig, "generate", guard, field="ts")


def test_replay_guard_forgets_old_nonces():
    g = wire.ReplayGuard(window_s=10)
    for i in range(10005):
        g.check(100.0, f"n{i}", now=100.0)
    g.check(200.0, "fresh", now=200.0)  # triggers pruning
    assert len(g._seen) == 1


def test_size_limits_before_auth():
    big = b"\x00" * (wire.DEFAULT_MAX_BYTES + 1)
    _raises(413, wire.decode_request, KEY, big, None, "generate")
    assert wire.max_bytes("import_session") == 256 * wire.MiB
    state = {"state": {"kv": b"\x00" * (wire.DEFAULT_MAX_BYTES + 10)}}
    data, sig = _req("import_session", state)
    assert wire.decode_request(KEY, data, sig, "import_session").op == "import_session"
    _raises(413, wire.decode_request, KEY, data, sig, "generate")


def test_version_op_and_envelope_checks():
    data, sig = _req()
    env = msgpack.unpackb(data)
    for change, status, field in [({"v": 2}, 426, "v"), ({"op": "nope"}, 400, "op"), ({"op": "info"}, 400, "op"),
                                  ({"extra": 1}, 400, "envelope.extra"), ({"nonce": "short"}, 400, "envelope.nonce"),
                                  ({"ts": "now"}, 400, "envelope.ts")]:
        e2 = {**env, **change, "nonce": change.get("nonce", os.urandom(8).hex())}
        d = msgpack.packb(e2)
        _raises(status, wire.decode_request, KEY, d, wire.sign(KEY, d), "generate", field=field)
    d = msgpack.packb([1, 2])
    _raises(400, wire.decode_request, KEY, d, wire.sign(KEY, d), "generate")
    d = msgpack.packb(env) + b"\x00"  # trailing bytes
    _raises(400, wire.decode_request, KEY, d, wire.sign(KEY, d), "generate")


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
    data, sig = _req("generate", body)
    _raises(400, wire.decode_request, KEY, data, sig, "generate", field=field)


def test_ext_types_refused():
    d = msgpack.packb({"v": 1, "op": "info", "ts": time.time(), "nonce": "a" * 16,
                       "body": {}, "mh": msgpack.ExtType(5, b"x")})
    _raises(400, wire.decode_request, KEY, d, wire.sign(KEY, d), "info")


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(wire.OPS + ("bogus",)), body=msgpack_values, extra=st.dictionaries(
    st.sampled_from(["v", "op", "ts", "nonce", "mh", "zz"]), msgpack_values, max_size=3))
def test_fuzz_decoder_only_wire_errors(op, body, extra):
    env = {"v": 1, "op": op, "ts": time.time(), "nonce": os.urandom(8).hex(), "body": body, **extra}
    data = msgpack.packb(env, use_bin_type=True)
    try:
        r = wire.decode_request(KEY, data, wire.sign(KEY, data), op)
    except WireError as e:
        assert 400 <= e.status < 500 and e.message
    else:
        assert r.op in wire.OPS and isinstance(r.body, dict)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), op=st.sampled_from(wire.OPS))
def test_fuzz_raw_bytes_signed(data, op):
    try:
        wire.decode_request(KEY, data, wire.sign(KEY, data), op)
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
    data = b"".join(wire.pack(f) for f in frames)
    u, got = wire.stream_unpacker(), []
    for i in range(0, len(data), 3):
        u.feed(data[i:i + 3])
        got += list(u)
    assert got == frames


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
