"""The node RPC wire format, below every layer that speaks it: a msgpack
envelope authenticated with HMAC-SHA256, size limits, per-op schemas, and the
one tensor codec. Both clients (cluster/client.py NodeClient for the router,
node/remote/peers.py PeerLink between nodes) and the node server build and
check every byte through these functions; they differ only in transport.

Request  = POST /rpc/<op>, body = msgpack({"v", "op", "ts", "nonce", "body"[, "mh"]}),
           header X-MLXMoE-Auth = hex HMAC-SHA256(cluster key, exact body bytes).
Response = msgpack({"ok": true, "body": ...}) or ({"ok": false, "error": {...}}),
           header X-MLXMoE-Auth = HMAC over b"resp:" + request nonce + response
           bytes, so the caller knows the answer came from a key holder too.
Stream   = (generate) a sequence of msgpack maps: {"t": "tok", ...} per token,
           then {"t": "end", ...}, or {"t": "err", ...} if it fails midway;
           the header HMAC covers b"stream:" + nonce.
Tensor   = {"dtype", "shape", "data"}: raw little-endian bytes (bf16 as its
           16 bits, so exact), for activations and exported KV state alike.

Checks run in this order, so a sender without the key learns nothing but 401:
size (413) -> HMAC (401) -> decode/envelope (400, version 426) -> freshness
(401, with a reason: the sender holds the key) -> per-op schema (400).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from mlxmoe.modes import ROUTING_MODES

PROTOCOL_VERSION = 1
AUTH_HEADER = "X-MLXMoE-Auth"
CONTENT_TYPE = "application/msgpack"
MiB = 1 << 20
DEFAULT_MAX_BYTES = 8 * MiB
OP_MAX_BYTES = {"import_session": 256 * MiB, "experts": 64 * MiB}
REPLAY_WINDOW_S = 60.0
MAX_TOKEN_ID = (1 << 31) - 1
MAX_PROMPT_TOKENS = 1 << 20
MAX_FRAME_BYTES = 1 << 20  # one stream frame


class WireError(Exception):
    """A request that must be refused: HTTP status, a short code, and a
    message naming the offending field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after: int | None = None

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


# ---------------------------------------------------------------- HMAC / limits

def sign(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def verify(key: bytes, data: bytes, signature: str | None) -> bool:
    if not signature or len(signature) != 64:
        return False
    # bytes, not str: compare_digest raises on non-ASCII str (a header can carry anything)
    return hmac.compare_digest(sign(key, data).encode(), signature.encode("utf-8", "replace"))


# What an answer's HMAC covers: bound to the request's nonce, so an answer
# cannot be replayed to another request.
def _resp_signed(nonce: str, data: bytes) -> bytes:
    return b"resp:" + nonce.encode() + data


def _stream_signed(nonce: str) -> bytes:
    return b"stream:" + nonce.encode()


def response_mac(key: bytes, nonce: str, data: bytes) -> str:
    return sign(key, _resp_signed(nonce, data))


def stream_mac(key: bytes, nonce: str) -> str:
    return sign(key, _stream_signed(nonce))


def verify_stream(key: bytes, nonce: str, signature: str | None) -> bool:
    return verify(key, _stream_signed(nonce), signature)


def max_bytes(op: str) -> int:
    return OP_MAX_BYTES.get(op, DEFAULT_MAX_BYTES)


class ReplayGuard:
    """Rejects envelopes whose ts is outside +-window or whose nonce was seen
    within the window. Nonces older than the window are forgotten (a replay
    that old fails the ts check anyway)."""

    def __init__(self, window_s: float = REPLAY_WINDOW_S):
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, ts: float, nonce: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if abs(now - ts) > self.window_s:
            raise WireError(401, "stale", f"field 'ts': timestamp is {now - ts:+.1f}s from this node's clock, "
                                          f"outside the {self.window_s:.0f}s replay window (are the Macs' clocks set?)", "ts")
        with self._lock:
            if len(self._seen) > 10000:
                self._seen = {n: t for n, t in self._seen.items() if now - t <= self.window_s}
            if nonce in self._seen:
                raise WireError(401, "replay", "field 'nonce': this request was already received (replay)", "nonce")
            self._seen[nonce] = now


# ---------------------------------------------------------------- schemas
# A field spec is a type name; "?" suffix = may be None. Nested dict schemas
# are dicts. `REQUIRED` lists required fields; every other field is optional,
# and fields not in the schema are refused.

PARAMS_SCHEMA = {
    "_required": ["max_tokens"],
    "max_tokens": "int",
    "temperature": "num",
    "top_p": "num",
    "stop": "list[str]",
    "seed": "int?",
    # routing modes (node/remote/): where each MoE layer's routed experts run
    "routing": "str",
    "expert_group": "int?",
    "peers": "dict[str,str]",  # str(group) -> node URL, from the router
    "resume": "int", "resume_chars": "int", "open_end": "bool",  # exact splice (node/stream.py text_events)
}
MAX_PEERS = 256

# An activation tensor: raw little-endian bytes of `shape` in `dtype`.
TENSOR_SCHEMA = {"_required": ["dtype", "shape", "data"], "dtype": "str", "shape": "list[int]", "data": "bytes"}
TENSOR_DTYPES = {"bf16": 2, "f16": 2, "f32": 4}  # an activation's wire dtype -> bytes per element

ENVELOPE_SCHEMA = {
    "_required": ["v", "op", "ts", "nonce", "body"],
    "v": "int", "op": "str", "ts": "num", "nonce": "str", "body": "dict",
    "mh": "str",  # manifest hash the caller expects (DESIGN: travels in every RPC)
}

OP_SCHEMAS: dict[str, dict] = {
    "info": {"_required": []},
    "prefill": {"_required": ["session", "prompt"], "session": "str", "prompt": "tokens"},
    "generate": {"_required": ["session", "prompt", "params"], "session": "str", "prompt": "tokens",
                 "params": PARAMS_SCHEMA},
    "close": {"_required": ["session"], "session": "str"},
    "export_session": {"_required": ["session"], "session": "str"},
    "import_session": {"_required": ["state"], "state": "dict"},
    # one MoE layer's routed-expert output for hidden states x, routed as this node's own block would
    "experts": {"_required": ["layer", "x"], "layer": "int", "x": TENSOR_SCHEMA, "ids": "list[int]",
                "rows": "list[int]"},
}
OPS = tuple(OP_SCHEMAS)


def _type_ok(value: Any, spec: str) -> bool:
    if spec.endswith("?"):
        return value is None or _type_ok(value, spec[:-1])
    if spec == "str":
        return isinstance(value, str)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "dict":
        return isinstance(value, dict)
    if spec == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if spec == "list[int]":
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if spec == "dict[str,str]":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if spec == "bytes":
        return isinstance(value, bytes)
    if spec == "tokens":
        return (isinstance(value, list) and len(value) <= MAX_PROMPT_TOKENS and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID for v in value))
    raise AssertionError(f"unknown spec {spec}")


_SPEC_WORDS = {"str": "a string", "int": "an integer", "num": "a number", "bool": "true/false",
               "dict": "a map", "list[str]": "a list of strings", "list[int]": "a list of integers",
               "dict[str,str]": "a map of strings to strings", "bytes": "binary data",
               "tokens": f"a list of token ids (integers 0..{MAX_TOKEN_ID}, at most {MAX_PROMPT_TOKENS})"}


def check_schema(obj: Any, schema: dict, where: str = "body") -> None:
    if not isinstance(obj, dict):
        raise WireError(400, "schema", f"field '{where}': must be a map", where)
    for key in obj:
        if not isinstance(key, str) or key.startswith("_") or key not in schema:
            raise WireError(400, "schema", f"field '{where}.{key}': not allowed here", f"{where}.{key}")
    for key in schema["_required"]:
        if key not in obj:
            raise WireError(400, "schema", f"field '{where}.{key}': required", f"{where}.{key}")
    for key, value in obj.items():
        spec, path = schema[key], f"{where}.{key}"
        if isinstance(spec, dict):
            check_schema(value, spec, path)
        elif not _type_ok(value, spec):
            words = _SPEC_WORDS[spec.rstrip("?")] + (" or nil" if spec.endswith("?") else "")
            raise WireError(400, "schema", f"field '{path}': must be {words}", path)


def _check_values(op: str, body: dict) -> None:
    """Range checks the type schema cannot express."""
    p = body.get("params")
    if p is not None:
        if not 0 <= p["max_tokens"] <= 1 << 20:
            raise WireError(400, "schema", "field 'body.params.max_tokens': must be 0..1048576", "body.params.max_tokens")
        if not 0.0 <= p.get("temperature", 0.0) <= 100.0:
            raise WireError(400, "schema", "field 'body.params.temperature': must be 0..100", "body.params.temperature")
        if not 0.0 < p.get("top_p", 1.0) <= 1.0:
            raise WireError(400, "schema", "field 'body.params.top_p': must be in (0, 1]", "body.params.top_p")
        _check_routing(p)
    if "x" in body:
        shape = check_tensor(body["x"], "body.x")
        check_expert_ids(body.get("ids"), body.get("rows"), math.prod(shape[:-1]))
    sess = body.get("session")
    if sess is not None and not 1 <= len(sess) <= 256:
        raise WireError(400, "schema", "field 'body.session': must be 1..256 characters", "body.session")


def _check_routing(p: dict) -> None:
    where = "body.params"
    if p.get("routing", "local") not in ROUTING_MODES:
        raise WireError(400, "schema", f"field '{where}.routing': {p['routing']!r} is not one of {', '.join(ROUTING_MODES)}",
                        f"{where}.routing")
    eg = p.get("expert_group")
    if eg is not None and not 0 <= eg < 1 << 16:
        raise WireError(400, "schema", f"field '{where}.expert_group': must be 0..65535", f"{where}.expert_group")
    peers = p.get("peers") or {}
    if len(peers) > MAX_PEERS:
        raise WireError(400, "schema", f"field '{where}.peers': at most {MAX_PEERS} entries", f"{where}.peers")
    for g, url in peers.items():
        if not g.isdigit() or len(g) > 5:
            raise WireError(400, "schema", f"field '{where}.peers': key {g[:20]!r} is not a group id", f"{where}.peers")
        if not url.startswith(("http://", "https://")) or len(url) > 512:
            raise WireError(400, "schema", f"field '{where}.peers.{g}': must be an http(s) URL", f"{where}.peers.{g}")
    if p.get("routing") == "group" and eg is None:
        raise WireError(400, "schema", f"field '{where}.expert_group': required with routing 'group'", f"{where}.expert_group")


def check_tensor(t: dict, where: str) -> tuple[int, ...]:
    """Structural checks of an activation tensor (dtype, shape, byte count);
    returns its shape. What fits the model (layer, hidden size) the node checks."""
    if t["dtype"] not in TENSOR_DTYPES:
        raise WireError(400, "schema", f"field '{where}.dtype': {t['dtype'][:20]!r} is not one of "
                                       f"{', '.join(TENSOR_DTYPES)}", f"{where}.dtype")
    shape = t["shape"]
    if not 2 <= len(shape) <= 3 or any(d < 1 for d in shape) or (len(shape) == 3 and shape[0] != 1):
        raise WireError(400, "schema", f"field '{where}.shape': {shape[:4]} is not [tokens, hidden] or "
                                       "[1, tokens, hidden] with positive sizes", f"{where}.shape")
    want = math.prod(shape) * TENSOR_DTYPES[t["dtype"]]
    if len(t["data"]) != want:
        raise WireError(400, "schema", f"field '{where}.data': {len(t['data'])} bytes, but shape {shape} in "
                                       f"{t['dtype']} needs {want}", f"{where}.data")
    return tuple(shape)


def check_expert_ids(ids: list | None, rows: list | None, n: int) -> None:
    """experts op with `ids`: one expert id per row of x (n rows), or, with
    `rows`, one row of x per id."""
    if ids is None and rows is not None:
        raise WireError(400, "schema", "field 'body.rows': only with 'ids'", "body.rows")
    if ids is not None and rows is None and len(ids) != n:
        raise WireError(400, "schema", f"field 'body.ids': {len(ids)} expert ids for {n} rows of x", "body.ids")
    if rows is not None and (len(rows) != len(ids) or not all(0 <= r < n for r in rows)):
        raise WireError(400, "schema", f"field 'body.rows': one row of x (0..{n - 1}) per expert id", "body.rows")


# ---------------------------------------------------------------- encode / decode

def new_nonce() -> str:
    return os.urandom(16).hex()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """msgpack -> Python, refusing anything odd (ext types, non-str keys)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               ext_hook=_no_ext)
    except WireError:
        raise
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, ValueError, ...)
        raise WireError(400, "malformed", f"body is not one valid msgpack value ({type(e).__name__}: {e})")


def _no_ext(code, data):
    raise WireError(400, "malformed", f"msgpack extension type {code} is not allowed")


@dataclass
class Request:
    op: str
    body: dict
    ts: float
    nonce: str
    mh: str | None = None


def encode_request(key: bytes, op: str, body: dict, mh: str | None = None,
                   ts: float | None = None, nonce: str | None = None) -> tuple[bytes, dict]:
    """(bytes, headers) for one RPC. The HMAC covers the exact bytes sent."""
    env = {"v": PROTOCOL_VERSION, "op": op, "ts": time.time() if ts is None else ts,
           "nonce": nonce or new_nonce(), "body": body}
    if mh is not None:
        env["mh"] = mh
    data = pack(env)
    return data, {AUTH_HEADER: sign(key, data), "Content-Type": CONTENT_TYPE}


def decode_request(key: bytes, data: bytes, signature: str | None, path_op: str,
                   guard: ReplayGuard | None = None) -> Request:
    """Verify, decode and schema-check one request; raise WireError otherwise."""
    if len(data) > max_bytes(path_op):
        raise WireError(413, "too_large", f"request is {len(data)} bytes; the limit for '{path_op}' is {max_bytes(path_op)}")
    if not verify(key, data, signature):
        raise WireError(401, "unauthorized", "unauthorized")
    env = unpack(data)
    if not isinstance(env, dict):
        raise WireError(400, "malformed", "envelope must be a msgpack map")
    v = env.get("v")
    if isinstance(v, int) and not isinstance(v, bool) and v != PROTOCOL_VERSION:
        raise WireError(426, "version", f"field 'v': protocol {v} is not supported; this node speaks {PROTOCOL_VERSION}", "v")
    check_schema(env, ENVELOPE_SCHEMA, "envelope")
    if env["op"] not in OP_SCHEMAS:
        raise WireError(400, "unknown_op", f"field 'op': unknown op {env['op']!r}; known: {', '.join(OPS)}", "op")
    if env["op"] != path_op:
        raise WireError(400, "op_mismatch", f"field 'op': {env['op']!r} does not match the URL's op {path_op!r}", "op")
    if not 8 <= len(env["nonce"]) <= 64:
        raise WireError(400, "schema", "field 'envelope.nonce': must be 8..64 characters", "envelope.nonce")
    (guard or ReplayGuard()).check(float(env["ts"]), env["nonce"])
    check_schema(env["body"], OP_SCHEMAS[env["op"]], "body")
    _check_values(env["op"], env["body"])
    return Request(env["op"], env["body"], float(env["ts"]), env["nonce"], env.get("mh"))


def ok_response(body: Any) -> bytes:
    return pack({"ok": True, "body": body})


def error_response(err: WireError | dict) -> bytes:
    return pack({"ok": False, "error": err.to_dict() if isinstance(err, WireError) else err})


# ---------------------------------------------------------------- caller side

def open_response(key: bytes, nonce: str, data: bytes, signature: str | None) -> Any:
    """The body of a 200 answer to the request with `nonce`, once its HMAC
    checks out. WireError (status 0: no HTTP status of its own) otherwise,
    with code "unauthenticated" or "bad_response"."""
    if not verify(key, _resp_signed(nonce, data), signature):
        raise WireError(0, "unauthenticated", "answer is not signed with our cluster key")
    try:
        msg = unpack(data)
    except WireError:
        msg = None
    if not isinstance(msg, dict) or msg.get("ok") is not True:
        raise WireError(0, "bad_response", "malformed answer")
    return msg.get("body")


def refusal(data: bytes) -> dict:
    """{code, message, field} of an error answer, or {} if it carries none.
    For the caller's message only: a refusal need not be signed (401)."""
    try:
        err = unpack(data).get("error")
    except Exception:
        return {}
    return err if isinstance(err, dict) else {}


def stream_unpacker() -> msgpack.Unpacker:
    """Feed it a generate stream's bytes; iterate it for frames."""
    return msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=MAX_FRAME_BYTES)


# ---------------------------------------------------------------- tensors
# wire dtype -> (mlx dtype, numpy dtype carrying the bytes). MLX loads only
# when a tensor travels: the router imports this module and never loads MLX.
_CODEC = {"bf16": ("bfloat16", "uint16"), "f16": ("float16", "float16"), "f32": ("float32", "float32"),
          "u8": ("uint8", "uint8"), "u16": ("uint16", "uint16"), "u32": ("uint32", "uint32"),
          "u64": ("uint64", "uint64"), "i8": ("int8", "int8"), "i16": ("int16", "int16"),
          "i32": ("int32", "int32"), "i64": ("int64", "int64"), "bool": ("bool_", "bool")}


def encode_tensor(a) -> dict:
    """mx.array -> {dtype, shape, data}; a dtype without a wire name travels as f32."""
    import mlx.core as mx
    import numpy as np

    names = {getattr(mx, m): w for w, (m, _) in _CODEC.items()}
    if a.dtype not in names:
        a = a.astype(mx.float32)
    name = names[a.dtype]
    data = np.array(a.view(mx.uint16) if name == "bf16" else a)
    return {"dtype": name, "shape": list(a.shape), "data": data.tobytes()}


def decode_tensor(t: dict):
    """{dtype, shape, data} -> mx.array, bit for bit what encode_tensor read."""
    import mlx.core as mx
    import numpy as np

    if t["dtype"] not in _CODEC:
        raise WireError(400, "schema", f"tensor dtype {str(t['dtype'])[:20]!r} is not one of {', '.join(_CODEC)}")
    a = mx.array(np.frombuffer(t["data"], _CODEC[t["dtype"]][1]).reshape(t["shape"]))
    return a.view(mx.bfloat16) if t["dtype"] == "bf16" else a
