"""Deterministic stand-ins for the runtime: FakeEngine (a node's Engine) and
FakeFrontend (the router's placement front end).

Tokens are bytes of UTF-8 text (ids 0..255), so encode/decode are exact. The
next generated token depends only on the context (prompt + tokens generated
so far), never on the node or group: a session continued on another node
after a failover produces exactly what the first node would have produced.

Run as a script to serve a FakeEngine node process (used by the netns test):
    python tests/fakes.py --group 0 --host 10.0.0.2 --port 7420 --key KEYFILE --interface 10.0.0.2
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Iterator

from mlxmoe.errors import AdmissionError, ContextOverflow, MlxMoeError, PeerError, SessionBusy, Unsupported
from mlxmoe.model.placement import PlacementScores
from mlxmoe.node.contract import TokenEvent
from mlxmoe.params import SAMPLING_DEFAULTS, GenParams
from mlxmoe.node.remote.peers import Inbox
from mlxmoe.node.stream import check_resume, text_events
from mlxmoe.cluster.node_server import SELF_CHECK

MODEL = "fake-moe"
HASH = "fakehash0001"
_TLS: dict = {}


def test_identity():
    """One cluster CA and node certificate per test process, in a temp dir
    (tests/conftest.py's `tls_identity` fixture; LocalCluster's default)."""
    if "ident" not in _TLS:
        import tempfile
        from mlxmoe.cluster import tls
        d = tempfile.mkdtemp(prefix="mlxmoe-tls-")
        tls.create_ca(d)
        _TLS["ident"] = tls.ensure_identity(d, "test-node", ["127.0.0.1", "localhost"])
    return _TLS["ident"]


def client_context():
    """An ssl context for a test's own raw requests to LocalCluster nodes."""
    from mlxmoe.cluster import tls
    return tls.client_context(test_identity())
ALPHABET = b"abcdefghijklmnopqrstuvwxyz     "


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(t & 0xFF for t in tokens).decode("utf-8", errors="replace")


def encode_chat(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> list[int]:
    text = "".join(f"<{m['role']}>{_content(m)}\n" for m in messages) + ("<assistant>" if add_generation_prompt else "")
    if continue_final_message:  # the last message stays open: the answer continues it
        text = text.removesuffix("\n")
    if tools:  # a template that renders tools itself
        text = "".join(f"<tool>{t['function']['name']}\n" for t in tools) + text
    return encode(text)


def _content(m: dict) -> str:
    c = m.get("content") or ""
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return str(c)


def next_token(ctx: list[int]) -> int:
    h = sum(ctx[-4:]) * 31 + len(ctx) * 7
    return ALPHABET[h % len(ALPHABET)]


# FakeEngine(unicode=True) picks characters (1, 2 and 3 UTF-8 bytes, and spaces) rather than bytes, one
# byte token at a time, so streams hold partial characters and tokens that start with a space
UNICODE = ["a", "b", " ", "c", "ж", " ", "€", "d", "ü", "e", " ", "\n"]
_LEADS = {c.encode()[0]: c.encode() for c in UNICODE}


def next_token_unicode(ctx: list[int]) -> int:
    """Complete a partial UTF-8 character at the end of `ctx`, else start a new one."""
    k = 0
    while k < 3 and k < len(ctx) and 0x80 <= ctx[-1 - k] < 0xC0:
        k += 1
    lead = ctx[-1 - k] if k < len(ctx) else 0
    if lead >= 0xC0:
        ch = _LEADS.get(lead) or bytes([lead]) + b"\xa9" * (1 + (lead >= 0xE0) + (lead >= 0xF0))
        if k + 1 < len(ch):
            return ch[k + 1]
    h = sum(ctx[-4:]) * 31 + len(ctx) * 7
    return UNICODE[h % len(UNICODE)].encode()[0]


def expected_text(prompt: list[int], n: int) -> str:
    """What any FakeEngine generates for `prompt` with max_tokens=n (no stops)."""
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return decode(ctx[len(prompt):])


class ByteDetokenizer:
    """mlx-lm's detokenizer interface over byte tokens, for node.stream.text_events."""

    def __init__(self):
        self.tokens: list[int] = []

    def reset(self):
        self.tokens = []

    def add_token(self, token):
        self.tokens.append(token)

    def finalize(self):
        pass

    @property
    def text(self) -> str:
        return decode(self.tokens)


class ByteSpmTokenizer:
    """The byte tokens in SentencePiece spelling (space = U+2581, other non-printable bytes as <0xXX>),
    so mlx-lm's SPMStreamingDetokenizer runs over FakeEngine's tokens: like a real tokenizer's, it
    drops the turn's leading space and holds back a partial UTF-8 character."""

    def __len__(self):
        return 256

    def convert_ids_to_tokens(self, ids):
        return ["\u2581" if b == 32 else chr(b) if 33 <= b < 127 else f"<0x{b:02X}>" for b in ids]


def spm_detokenizer():
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    return SPMStreamingDetokenizer(ByteSpmTokenizer())


class FakeEngine:
    """Implements mlxmoe.node.contract.Engine (tests/contract/ checks it
    against the real node): same errors, context rule, stop-string rule and
    export format; no remote experts (experts_op None).

    delay: seconds per token; max_sessions: admission limit on sessions that
    hold a cache (idle ones are evicted first, AdmissionError when none is
    idle); fail_after: the node fails (RuntimeError) after that many tokens of
    a stream; peer_fail_after: a remote-experts peer fails (PeerError) there
    instead; max_context: the context limit; free_kv: KV budget left, as
    info() reports it; hold: a threading.Event each stream's first token
    waits for (the engine thread busy, as in a long prefill; at most 30 s);
    spm: detokenize with mlx-lm's SPMStreamingDetokenizer (ByteSpmTokenizer)
    instead of plain bytes; unicode: generate UNICODE characters
    (next_token_unicode). Records prefix reuse in `reused` for tests."""

    VOCAB = 256

    def __init__(self, group: int = 0, n_groups: int = 3, model_id: str = MODEL, manifest_hash: str = HASH,
                 delay: float = 0.0, max_sessions: int | None = None, fail_after: int | None = None,
                 peer_fail_after: int | None = None, max_context: int = 8192, free_kv: int | None = None,
                 hold: threading.Event | None = None, spm: bool = False, unicode: bool = False):
        self.manifest = SimpleNamespace(model_id=model_id, hash=manifest_hash, n_groups=n_groups)
        self.group = group
        self.inbox = Inbox()
        self.delay, self.max_sessions = delay, max_sessions
        self.fail_after, self.peer_fail_after = fail_after, peer_fail_after
        self.max_context, self.free_kv = max_context, free_kv
        self.hold = hold
        self.spm, self.next_token = spm, next_token_unicode if unicode else next_token
        self.sessions: dict[str, list[int]] = {}  # session -> tokens in its cache ([] once evicted)
        self.busy: set[str] = set()
        self.reused: list[tuple[str, int]] = []  # (session, cached prefix length) per generate/prefill call
        self.generated = 0
        self.threads: set[str] = set()
        self.key: bytes | None = None
        self.started = time.time()

    def info(self) -> dict:
        self.threads.add(threading.current_thread().name)
        return {"model": self.manifest.model_id, "manifest_hash": self.manifest.hash, "group": self.group,
                "n_groups": self.manifest.n_groups, "sessions": len(self.sessions),
                "active_sessions": len(self.busy), "free_kv": self.free_kv, "context_limit": self.max_context,
                "kv_bits": None, "backend": "fake", "experts_op": None, "uptime_s": time.time() - self.started}

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        return encode_chat(messages, **template_kwargs)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def attach_cluster(self, key: bytes) -> None:
        self.key = key

    def _check(self, prompt, max_tokens: int) -> None:
        """The node's rules (node.engine.Node.check_prompt)."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise MlxMoeError("prompt: expected a non-empty list of token ids")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.VOCAB]
        if bad:
            raise MlxMoeError(f"prompt: token ids {bad[:5]} are outside the vocabulary (0..{self.VOCAB - 1})")
        if len(prompt) >= self.max_context:
            raise ContextOverflow(f"prompt: {len(prompt)} tokens do not fit the context limit of "
                                  f"{self.max_context} tokens")
        if max_tokens < 1:
            raise MlxMoeError("max_tokens: must be at least 1")

    def _open(self, session_id: str, prompt: list[int]) -> int:
        """Admit the session and reuse its cached prefix; returns that prefix length."""
        if session_id in self.busy:
            raise SessionBusy(f"session {session_id}: already generating")
        old = self.sessions.get(session_id, [])
        if not old and self.max_sessions is not None:
            cached = [s for s, toks in self.sessions.items() if toks]
            if len(cached) >= self.max_sessions:
                idle = [s for s in cached if s not in self.busy]
                if not idle:
                    raise AdmissionError(f"KV budget full: {len(cached)} sessions generating, none idle to evict")
                self.sessions[idle[0]] = []  # evicted: its cache is gone, the session stays
        common = 0
        while common < min(len(old), len(prompt)) and old[common] == prompt[common]:
            common += 1
        if session_id != SELF_CHECK:  # the node's start-up check is not a test's traffic
            self.reused.append((session_id, common))
        return common

    def generate(self, session_id: str | None, prompt: list[int], params: GenParams) -> Iterator[TokenEvent]:
        self.threads.add(threading.current_thread().name)
        self._check(prompt, params.max_tokens)
        check_resume(prompt, params.resume, params.resume_chars)
        bad = [k for k in params.logit_bias if not str(k).isdigit() or int(k) >= self.VOCAB]
        if bad:  # the node's rule (node.engine.check_sampling)
            raise MlxMoeError(f"logit_bias: token id {str(bad[0])[:20]!r} is outside the vocabulary (0..{self.VOCAB - 1})")
        max_tokens = min(params.max_tokens, self.max_context - len(prompt))
        sid = session_id or uuid.uuid4().hex
        self._open(sid, prompt)
        ctx = list(prompt)
        self.sessions[sid] = ctx
        return self._gen(sid, ctx, params, max_tokens)

    def _steps(self, ctx: list[int], max_tokens: int, n_top: int = 0, sid: str = "") -> Iterator[tuple]:
        for i in range(max_tokens):
            if i == 0 and self.hold is not None and sid != SELF_CHECK:  # the node's own start-up check is not held
                self.hold.wait(30)
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError(f"fake failure after {i} tokens")
            if self.peer_fail_after is not None and i >= self.peer_fail_after:
                raise PeerError(f"fake peer failure after {i} tokens", peer="http://fake-peer")
            if self.delay:
                time.sleep(self.delay)
            tok = self.next_token(ctx)
            ctx.append(tok)
            self.generated += sid != SELF_CHECK
            lp = -0.1 * (tok % 7 + 1)
            # top_logprobs: the chosen token first, then made-up runners-up (what a node sends: best first)
            top = [{"token": t, "text": decode([t]), "logprob": lp - i} for i, t in
                   enumerate([tok] + [b for b in dict.fromkeys(ALPHABET) if b != tok][:n_top - 1])] if n_top else None
            yield tok, lp, top

    def _gen(self, session_id: str, ctx: list[int], params: GenParams, max_tokens: int) -> Iterator[TokenEvent]:
        self.busy.add(session_id)
        try:
            turn = ctx[len(ctx) - params.resume:]  # a continued turn's tokens so far (exact splice)
            detok = spm_detokenizer() if self.spm else ByteDetokenizer()
            yield from text_events(self._steps(ctx, max_tokens, params.top_logprobs, session_id), detok, set(),
                                   params.stop, max_tokens,
                                   turn, params.resume_chars, params.open_end and max_tokens == params.max_tokens)
        finally:
            self.busy.discard(session_id)

    def adopt(self, manifest: dict) -> str:
        """A fake manifest {"model_id", "hash", "n_groups"}: same model, this engine's group still in it."""
        if not isinstance(manifest, dict) or manifest.get("model_id") != self.manifest.model_id:
            raise MlxMoeError("manifest: another model than this node's")
        if not isinstance(manifest.get("hash"), str) or not isinstance(manifest.get("n_groups"), int) \
                or not self.group < manifest["n_groups"]:
            raise MlxMoeError("manifest: needs a hash and this node's group")
        self.manifest = SimpleNamespace(model_id=self.manifest.model_id, hash=manifest["hash"],
                                        n_groups=manifest["n_groups"])
        return self.manifest.hash

    def prepare(self, params: GenParams) -> None:
        """A grammar compiles (on the byte tokenizer) as a node's does: bad specs are refused before any row."""
        if params.grammar is not None:
            from mlxmoe.node.grammar_spec import compile_spec
            compile_spec(params.grammar)

    def prefill(self, session_id: str, prompt: list[int], paced: bool = False) -> int:
        self.threads.add(threading.current_thread().name)  # paced or not, all at once (a fake's prefill is free)
        self._check(prompt, 1)
        if self.sessions.get(session_id) == list(prompt):
            return 0
        n = self._open(session_id, prompt)
        self.sessions[session_id] = list(prompt)
        return len(prompt) - n

    def close_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def export_session(self, session_id: str) -> dict:
        if session_id not in self.sessions:
            raise KeyError(session_id)
        if session_id in self.busy:  # as the real node: not while a stream is still open
            raise SessionBusy(f"session {session_id}: still generating; export it after the stream ends")
        toks = self.sessions[session_id]
        caches = [{"type": "FakeCache", "state": {"v": bytes(toks)}}] if toks else []
        return {"id": session_id, "tokens": list(toks), "caches": caches, "manifest": self.manifest.hash}

    def import_session(self, state: dict) -> str:
        if state.get("manifest") != self.manifest.hash:
            raise MlxMoeError(f"session {state.get('id')}: exported from manifest {state.get('manifest')}, "
                              f"this node serves {self.manifest.hash}")
        sid = str(state["id"])
        self.sessions[sid] = [int(t) for t in state["tokens"]]
        return sid

    def experts(self, layer: int, x: dict, ids: list[int] | None = None, rows: list[int] | None = None) -> dict:
        raise Unsupported("this node does not serve remote experts")


class FakeFrontend:
    """Placement front end (node.contract.Frontend): `score` favours group k when the text contains
    "topic<k>"; otherwise a hash of the text picks the best group. Fixed
    scores can be forced with `fixed`."""

    def __init__(self, n_groups: int = 3, model_id: str = MODEL, manifest_hash: str = HASH,
                 fixed: dict[int, float] | None = None):
        self.manifest = SimpleNamespace(model_id=model_id, hash=manifest_hash, n_groups=n_groups)
        self.sampling_defaults = dict(SAMPLING_DEFAULTS)
        self.fixed = fixed
        self.score_calls = 0

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        return encode_chat(messages, **template_kwargs)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, tokens: list[int]) -> str:
        return decode(tokens)

    def score(self, tokens: list[int]) -> PlacementScores:
        if not tokens:
            raise MlxMoeError("placement: the prompt has no tokens")
        self.score_calls += 1
        n = self.manifest.n_groups
        if self.fixed is not None:
            scores = dict(self.fixed)
        else:
            text = decode(tokens)
            hits = [g for g in range(n) if f"topic{g}" in text]
            best = hits[0] if hits else int(hashlib.sha256(text.encode()).hexdigest(), 16) % n
            scores = {g: (0.8 if g == best else 0.1 + 0.01 * g) for g in range(n)}
        return PlacementScores(scores=scores, layers=[1, 2], n_tokens=len(tokens))


class LoopThread:
    """An asyncio loop on a background thread, so sync test code (the openai
    client, an MLX oracle) can talk to servers in it. Subclasses define
    async _start/_stop; `with` runs them."""

    def __init__(self):
        import asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro, timeout: float = 30.0):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self):
        self.thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc):
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class LocalCluster(LoopThread):
    """Node servers (FakeEngines) + a router with its API, on loopback.
    Static peers only (no mDNS).

        with LocalCluster([FakeEngine(group=0), FakeEngine(group=1)]) as c:
            c.api_url ...
    """

    def __init__(self, engines: list, frontend: "FakeFrontend | None" = None, key: bytes = b"k" * 32,
                 names: list[str] | None = None, tls="test", chat_page: bool = True, limits=None, **router_kw):
        """tls: "test" (default: mutual TLS with the test CA), an Identity, or None (plain HTTP).
        chat_page: serve the web chat page at /chat. limits: the router's HttpLimits."""
        super().__init__()
        self.chat_page, self.limits = chat_page, limits
        self.engines, self.key = engines, key
        self.tls = test_identity() if tls == "test" else tls
        self.names = names or [f"node{i}" for i in range(len(engines))]
        self.frontend = frontend or FakeFrontend(n_groups=max(e.manifest.n_groups for e in engines))
        self.router_kw = {"probe_interval": 0.5, "token_timeout": 5.0, "first_token_timeout": 10.0, **router_kw}
        self.nodes: list = []
        self.running = None

    async def _start(self):
        from mlxmoe.cluster.api import start_router
        from mlxmoe.ui.status_page import render
        from mlxmoe.cluster.node_server import start_node
        from mlxmoe.cluster.router import Router
        for i, e in enumerate(self.engines):
            self.nodes.append(await start_node(e, self.key, "127.0.0.1", 0, advertise=False, name=self.names[i],
                                               tls=self.tls))
        router = Router(self.frontend, self.key, static_peers=[n.url for n in self.nodes], mdns=False,
                        tls=self.tls, **self.router_kw)
        from mlxmoe.ui import chat_page
        from mlxmoe.cluster.api.app import HttpLimits
        self.running = await start_router(router, "127.0.0.1", 0, page=render, limits=self.limits or HttpLimits(),
                                          chat_page=chat_page.render if self.chat_page else None)

    async def _stop(self):
        if self.running:
            await self.running.stop()
        for n in self.nodes:
            try:
                await n.stop()
            except Exception:
                pass

    @property
    def router(self):
        return self.running.router

    @property
    def api_url(self) -> str:
        return self.running.url

    def node_url(self, i: int) -> str:
        return self.nodes[i].url

    def kill(self, i: int) -> None:
        """Node i vanishes: connections dropped, port closed."""
        self.run(self.nodes[i].kill())

    def peer_name(self, i: int) -> str:
        return self.router.peers.by_url(self.nodes[i].url).name


def _main() -> None:
    """`fakes.py node ...` serves a FakeEngine; `fakes.py router ...` runs a
    router with a FakeFrontend (processes for the netns test)."""
    import argparse
    import asyncio

    from mlxmoe.cluster.keys import load_key

    ap = argparse.ArgumentParser(description="FakeEngine node / FakeFrontend router (tests)")
    ap.add_argument("role", choices=["node", "router"])
    ap.add_argument("--group", type=int, default=0)
    ap.add_argument("--n-groups", type=int, default=3)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--key", required=True)
    ap.add_argument("--interface", default=None)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--manifest-hash", default=HASH)
    ap.add_argument("--no-advertise", action="store_true")
    a = ap.parse_args()
    key = load_key(a.key)
    if a.role == "node":
        from mlxmoe.cluster.node_server import serve_node
        eng = FakeEngine(group=a.group, n_groups=a.n_groups, delay=a.delay, manifest_hash=a.manifest_hash)
        asyncio.run(serve_node(eng, key, host=a.host, port=a.port, advertise=not a.no_advertise,
                               interface=a.interface))
    else:
        from mlxmoe.cluster.api import serve_router
        from mlxmoe.ui.status_page import render
        from mlxmoe.cluster.router import Router
        router = Router(FakeFrontend(n_groups=a.n_groups, manifest_hash=a.manifest_hash), key,
                        interface=a.interface, probe_interval=1.0, token_timeout=10.0)
        asyncio.run(serve_router(router, a.host, a.port, page=render))


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free right now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


if __name__ == "__main__":
    _main()
