"""The node RPC wire format, below every layer that speaks it: a signed
preamble in the HTTP headers, msgpack bodies, size limits, per-op schemas, and
the one tensor codec. Both clients (cluster/client.py NodeClient for the router,
node/remote/peers.py PeerLink between nodes) and the node server build and
check every byte through these functions; they differ only in transport.

Request  = POST /rpc/<op>, body = msgpack(op body), and two headers:
           X-MLXMoE-Req  = base64url(msgpack({"v", "op", "ts", "nonce", "dst", "ep",
                           "len", "sha", "src"[, "mh"]})): the preamble;
           X-MLXMoE-Auth = hex HMAC-SHA256(cluster key, b"req:" + preamble bytes).
           The preamble names the destination node (`dst`, its name as `hello`
           reports it) and its per-process epoch (`ep`), the body's length and
           sha256, so a node authenticates a request from its headers alone,
           before it reads a byte of the body (docs/SECURITY.md).
Hello    = GET /hello, unauthenticated: {"node", "epoch", "protocol"}; how a
           caller learns what to put in dst/ep (a lie there only gets refused).
Response = msgpack({"ok": true, "body": ...}) or ({"ok": false, "error": {...}}),
           header X-MLXMoE-Auth = HMAC over b"resp:" + request nonce + response
           bytes, so the caller knows the answer came from a key holder too.
Stream   = (generate) a sequence of msgpack [frame bytes, mac]: each frame a
           msgpack map, {"t": "tok", ...} per token, then {"t": "end", ...} or
           {"t": "err", ...}; mac_i = HMAC(key, mac_{i-1} + i + frame)[:16],
           mac_0 = the header HMAC over b"stream:" + nonce, so no frame can be
           altered, dropped, reordered or spliced from another stream.
Tensor   = {"dtype", "shape", "data"}: raw little-endian bytes (bf16 as its
           16 bits, so exact), for activations and exported KV state alike.

Checks run in this order, so a sender without the key learns nothing but 401
and makes the node read nothing but its headers: Content-Length vs the op's
limit (413) -> preamble HMAC (401) -> preamble decode (400, version 426) ->
destination/epoch/freshness (401, with a reason: the sender holds the key) ->
Content-Length == signed length (400) -> body read, sha256 (401) -> per-op
schema (400).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from mlxmoe import params
from mlxmoe.errors import MlxMoeError

PROTOCOL_VERSION = 2
AUTH_HEADER = "X-MLXMoE-Auth"
PREAMBLE_HEADER = "X-MLXMoE-Req"
MAX_PREAMBLE_CHARS = 2048  # a real preamble is ~250; the rest is a hostile header
CONTENT_TYPE = "application/msgpack"
MiB = 1 << 20
DEFAULT_MAX_BYTES = 8 * MiB
OP_MAX_BYTES = {"import_session": 256 * MiB, "experts": 64 * MiB}
REPLAY_WINDOW_S = 60.0
MAX_TOKEN_ID = (1 << 31) - 1
MAX_PROMPT_TOKENS = 1 << 20
MAX_FRAME_BYTES = 1 << 20  # one stream frame


class WireError(MlxMoeError):
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


FRAME_MAC_BYTES = 16


class StreamSigner:
    """The node's side of a generate stream: each frame chained to the last."""

    def __init__(self, key: bytes, nonce: str):
        self.key, self.mac, self.n = key, bytes.fromhex(stream_mac(key, nonce)), 0

    def frame(self, obj: dict) -> bytes:
        data = pack(obj)
        self.mac = _frame_mac(self.key, self.mac, self.n, data)
        self.n += 1
        return pack([data, self.mac])


class StreamVerifier:
    """The caller's side: opens [frame bytes, mac] items in order, or raises
    WireError (status 0) for a frame that is altered, dropped or foreign."""

    def __init__(self, key: bytes, nonce: str):
        self.key, self.mac, self.n = key, bytes.fromhex(stream_mac(key, nonce)), 0

    def open(self, item: Any) -> dict:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
            raise WireError(0, "bad_response", "malformed stream frame")
        mac = _frame_mac(self.key, self.mac, self.n, item[0])
        if not hmac.compare_digest(mac, item[1]):
            raise WireError(0, "unauthenticated", f"stream frame {self.n} is not signed in sequence with our cluster key")
        self.mac, self.n = mac, self.n + 1
        frame = unpack(item[0])
        if not isinstance(frame, dict):
            raise WireError(0, "bad_response", "malformed stream frame")
        return frame


def _frame_mac(key: bytes, prev: bytes, n: int, data: bytes) -> bytes:
    return hmac.new(key, prev + n.to_bytes(8, "big") + data, hashlib.sha256).digest()[:FRAME_MAC_BYTES]


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
        if not abs(now - ts) <= self.window_s:  # NaN compares false: stale, as is inf
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

# generate's params: a GenParams as a dict, its fields' types from the one table (mlxmoe/params.py)
PARAMS_SCHEMA = {"_required": ["max_tokens"], **{name: f.wire for name, f in params.FIELDS.items()}}

# An activation tensor: raw little-endian bytes of `shape` in `dtype`.
TENSOR_SCHEMA = {"_required": ["dtype", "shape", "data"], "dtype": "str", "shape": "list[int]", "data": "bytes"}
TENSOR_DTYPES = {"bf16": 2, "f16": 2, "f32": 4}  # an activation's wire dtype -> bytes per element

PREAMBLE_SCHEMA = {
    "_required": ["v", "op", "ts", "nonce", "dst", "ep", "len", "sha"],
    "v": "int", "op": "str", "ts": "num", "nonce": "str",
    "dst": "str", "ep": "str",  # the destination node's name and per-process epoch
    "len": "int", "sha": "bytes",  # the body's length and sha256
    "src": "str",  # who sends it (the router's name): whose sessions `held` lists
    "mh": "str",  # manifest hash the caller expects (it travels in every RPC: docs/ARCHITECTURE.md)
}

# An exported session (node/kvstate.py); what is inside a cache the engine checks.
CACHE_SCHEMA = {"_required": ["type", "state"], "type": "str", "state": "any", "meta": "any"}
STATE_SCHEMA = {"_required": ["id", "tokens", "caches", "manifest"], "id": "str", "tokens": "tokens",
                "caches": "list[dict]", "manifest": "str"}
MAX_HELD = 1 << 16

OP_SCHEMAS: dict[str, dict] = {
    # `held`: the caller's sessions on this node; its others, idle, are closed (docs/SECURITY.md)
    "info": {"_required": [], "held": "list[str]"},
    "prefill": {"_required": ["session", "prompt"], "session": "str", "prompt": "tokens"},
    "generate": {"_required": ["session", "prompt", "params"], "session": "str", "prompt": "tokens",
                 "params": PARAMS_SCHEMA},
    "close": {"_required": ["session"], "session": "str"},
    "export_session": {"_required": ["session"], "session": "str"},
    "import_session": {"_required": ["state"], "state": STATE_SCHEMA},
    # one MoE layer's routed-expert output for hidden states x, routed as this node's own block would
    "experts": {"_required": ["layer", "x"], "layer": "int", "x": TENSOR_SCHEMA, "ids": "list[int]",
                "rows": "list[int]"},
    # a new manifest of the same model in which this node's part is unchanged (a Mac joined: `mlxmoe up`)
    "adopt": {"_required": ["manifest"], "manifest": "any"},
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
    if spec == "dict[str,num]":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for k, v in value.items())
    if spec == "bytes":
        return isinstance(value, bytes)
    if spec == "any":
        return True
    if spec == "list[dict]":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if spec == "tokens":
        return (isinstance(value, list) and len(value) <= MAX_PROMPT_TOKENS and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID for v in value))
    raise AssertionError(f"unknown spec {spec}")


_SPEC_WORDS = {"str": "a string", "int": "an integer", "num": "a number", "bool": "true/false",
               "dict": "a map", "list[str]": "a list of strings", "list[int]": "a list of integers",
               "dict[str,str]": "a map of strings to strings", "bytes": "binary data",
               "dict[str,num]": "a map of strings to numbers",
               "list[dict]": "a list of maps",
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
        try:
            params.check(p, "body.params")  # the ranges: the same check as the API's and the engine's
        except params.ParamError as e:
            raise WireError(400, "schema", f"field {e}", e.param) from None
    if "x" in body:
        shape = check_tensor(body["x"], "body.x")
        check_expert_ids(body.get("ids"), body.get("rows"), math.prod(shape[:-1]))
    if "state" in body:
        for i, c in enumerate(body["state"]["caches"]):
            check_schema(c, CACHE_SCHEMA, f"body.state.caches.{i}")
        sid = body["state"]["id"]
        if not 1 <= len(sid) <= 256:
            raise WireError(400, "schema", "field 'body.state.id': must be 1..256 characters", "body.state.id")
    if len(body.get("held", ())) > MAX_HELD:
        raise WireError(400, "schema", f"field 'body.held': at most {MAX_HELD} session ids", "body.held")
    sess = body.get("session")
    if sess is not None and not 1 <= len(sess) <= 256:
        raise WireError(400, "schema", "field 'body.session': must be 1..256 characters", "body.session")


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
    src: str = ""


@dataclass
class Preamble:
    """A request's signed headers, verified: what the body must be."""
    op: str
    ts: float
    nonce: str
    length: int
    sha: bytes
    mh: str | None = None
    src: str = ""


def encode_request(key: bytes, op: str, body: dict, mh: str | None = None,
                   ts: float | None = None, nonce: str | None = None, *, dst: str = "", epoch: str = "",
                   src: str = "") -> tuple[bytes, dict]:
    """(body bytes, headers) for one RPC to node `dst` in its `epoch`."""
    data = pack(body)
    pre = {"v": PROTOCOL_VERSION, "op": op, "ts": time.time() if ts is None else ts, "nonce": nonce or new_nonce(),
           "dst": dst, "ep": epoch, "len": len(data), "sha": hashlib.sha256(data).digest(), "src": src}
    if mh is not None:
        pre["mh"] = mh
    raw = pack(pre)
    return data, {PREAMBLE_HEADER: base64.urlsafe_b64encode(raw).decode(), AUTH_HEADER: sign(key, b"req:" + raw),
                  "Content-Type": CONTENT_TYPE}


def check_length(path_op: str, content_length: int | None) -> None:
    """Before anything else: a body past the op's limit is never read (413)."""
    if content_length is not None and content_length > max_bytes(path_op):
        raise WireError(413, "too_large", f"request is {content_length} bytes; "
                                          f"the limit for '{path_op}' is {max_bytes(path_op)}")


def open_preamble(key: bytes, headers, path_op: str, dst: str, epoch: str,
                  guard: ReplayGuard | None = None, content_length: int | None = None) -> Preamble:
    """Authenticate a request from its headers alone (a mapping with .get);
    raise WireError otherwise. Reads nothing of the body."""
    check_length(path_op, content_length)
    text, sig = headers.get(PREAMBLE_HEADER), headers.get(AUTH_HEADER)
    if not text or len(text) > MAX_PREAMBLE_CHARS or not sig:
        raise WireError(401, "unauthorized", "unauthorized")
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise WireError(401, "unauthorized", "unauthorized") from None
    if not verify(key, b"req:" + raw, sig):
        raise WireError(401, "unauthorized", "unauthorized")
    pre = unpack(raw)
    if not isinstance(pre, dict):
        raise WireError(400, "malformed", "preamble must be a msgpack map")
    v = pre.get("v")
    if isinstance(v, int) and not isinstance(v, bool) and v != PROTOCOL_VERSION:
        raise WireError(426, "version", f"field 'v': protocol {v} is not supported; this node speaks {PROTOCOL_VERSION}", "v")
    check_schema(pre, PREAMBLE_SCHEMA, "preamble")
    if pre["op"] not in OP_SCHEMAS:
        raise WireError(400, "unknown_op", f"field 'op': unknown op {pre['op'][:40]!r}; known: {', '.join(OPS)}", "op")
    if pre["op"] != path_op:
        raise WireError(400, "op_mismatch", f"field 'op': {pre['op']!r} does not match the URL's op {path_op[:40]!r}", "op")
    if not 8 <= len(pre["nonce"]) <= 64:
        raise WireError(400, "schema", "field 'preamble.nonce': must be 8..64 characters", "preamble.nonce")
    if pre["dst"] != dst:
        raise WireError(401, "destination", f"field 'dst': this request is for node {pre['dst'][:80]!r}, "
                                            f"this is {dst!r} (ask /hello)", "dst")
    if pre["ep"] != epoch:
        raise WireError(401, "epoch", "field 'ep': this request is for another run of this node "
                                      "(it restarted; ask /hello)", "ep")
    (guard or ReplayGuard()).check(float(pre["ts"]), pre["nonce"])
    if not 0 <= pre["len"] <= max_bytes(path_op) or len(pre["sha"]) != 32:
        raise WireError(400, "schema", "field 'len': must be 0..the op's limit, with a 32-byte sha", "len")
    if content_length != pre["len"]:
        raise WireError(400, "length", f"Content-Length {content_length} is not the signed length {pre['len']}", "len")
    return Preamble(pre["op"], float(pre["ts"]), pre["nonce"], pre["len"], pre["sha"], pre.get("mh"), pre.get("src", ""))


def open_body(pre: Preamble, data: bytes, digest: bytes | None = None) -> Request:
    """The body a verified preamble announced: sha256 (401), then schema (400)."""
    digest = hashlib.sha256(data).digest() if digest is None else digest
    if len(data) != pre.length or not hmac.compare_digest(digest, pre.sha):
        raise WireError(401, "body_digest", "the body is not the one the signed headers announce (altered in transit?)")
    body = unpack(data)
    check_schema(body, OP_SCHEMAS[pre.op], "body")
    _check_values(pre.op, body)
    return Request(pre.op, body, pre.ts, pre.nonce, pre.mh, pre.src)


def decode_request(key: bytes, headers, data: bytes, path_op: str, dst: str = "", epoch: str = "",
                   guard: ReplayGuard | None = None) -> Request:
    """open_preamble + open_body for a body already in memory (tests, tools)."""
    pre = open_preamble(key, headers, path_op, dst, epoch, guard, len(data))
    return open_body(pre, data)


def hello_response(node: str, epoch: str) -> bytes:
    return pack({"node": node, "epoch": epoch, "protocol": PROTOCOL_VERSION})


def open_hello(data: bytes) -> tuple[str, str]:
    """(node, epoch) from a /hello answer; WireError (status 0) if malformed.
    Unsigned on purpose: a lie only gets our next request refused."""
    try:
        h = unpack(data)
    except WireError:
        h = None
    if not (isinstance(h, dict) and isinstance(h.get("node"), str) and isinstance(h.get("epoch"), str)):
        raise WireError(0, "bad_response", "malformed /hello answer (not an mlxmoe node of this protocol?)")
    return h["node"], h["epoch"]


# Refusals after which the caller asks /hello again and retries once: the
# request did nothing, and the node's name or run changed.
REHELLO_CODES = ("destination", "epoch")


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
    """Feed it a generate stream's bytes; iterate it for [frame, mac] items
    (StreamVerifier.open each)."""
    return msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=MAX_FRAME_BYTES, ext_hook=_no_ext)


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
