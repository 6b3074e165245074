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
import threading
import time
from types import SimpleNamespace
from typing import Iterator

from mlxmoe.errors import AdmissionError, ContextOverflow
from mlxmoe.errors import SessionBusy
from mlxmoe.model.placement import PlacementScores
from mlxmoe.node.contract import GenParams, TokenEvent

MODEL = "fake-moe"
HASH = "fakehash0001"
ALPHABET = b"abcdefghijklmnopqrstuvwxyz     "


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(t & 0xFF for t in tokens).decode("utf-8", errors="replace")


def encode_chat(messages: list[dict]) -> list[int]:
    text = "".join(f"<{m['role']}>{_content(m)}\n" for m in messages) + "<assistant>"
    return encode(text)


def _content(m: dict) -> str:
    c = m.get("content") or ""
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return str(c)


def next_token(ctx: list[int]) -> int:
    h = sum(ctx[-4:]) * 31 + len(ctx) * 7
    return ALPHABET[h % len(ALPHABET)]


def expected_text(prompt: list[int], n: int) -> str:
    """What any FakeEngine generates for `prompt` with max_tokens=n (no stops)."""
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return decode(ctx[len(prompt):])


class FakeEngine:
    """Implements mlxmoe.node.contract.Engine.

    delay: seconds per token; max_sessions: admission limit (AdmissionError
    when full and no idle session can be evicted); fail_after: raise after
    that many tokens of a stream (a node failing mid-stream); max_context:
    ContextOverflow past it. Records prefix reuse in `reused` for tests."""

    def __init__(self, group: int = 0, n_groups: int = 3, model_id: str = MODEL, manifest_hash: str = HASH,
                 delay: float = 0.0, max_sessions: int | None = None, fail_after: int | None = None,
                 max_context: int = 8192, free_memory: int | None = None):
        self.manifest = SimpleNamespace(model_id=model_id, hash=manifest_hash, n_groups=n_groups)
        self.group = group
        self.delay, self.max_sessions, self.fail_after = delay, max_sessions, fail_after
        self.max_context, self.free_memory = max_context, free_memory
        self.sessions: dict[str, list[int]] = {}
        self.busy: set[str] = set()
        self.reused: list[tuple[str, int]] = []  # (session, cached prefix length) per generate call
        self.generated = 0
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def info(self) -> dict:
        self.threads.add(threading.current_thread().name)
        d = {"model": self.manifest.model_id, "manifest_hash": self.manifest.hash, "group": self.group,
             "n_groups": self.manifest.n_groups, "sessions": len(self.sessions),
             "max_context": self.max_context, "backend": "fake"}
        if self.free_memory is not None:
            d["free_memory"] = self.free_memory
        return d

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(messages)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def _admit(self, session_id: str) -> None:
        if session_id in self.sessions or self.max_sessions is None or len(self.sessions) < self.max_sessions:
            return
        idle = [s for s in self.sessions if s not in self.busy]
        if not idle:
            raise AdmissionError(f"KV budget full: {len(self.sessions)} active sessions, none idle to evict")
        del self.sessions[idle[0]]

    def generate(self, session_id: str, prompt: list[int], params: GenParams) -> Iterator[TokenEvent]:
        self.threads.add(threading.current_thread().name)
        if len(prompt) + params.max_tokens > self.max_context:
            raise ContextOverflow(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} "
                                  f"exceeds the context limit of {self.max_context}")
        self._admit(session_id)
        old = self.sessions.get(session_id, [])
        common = 0
        while common < min(len(old), len(prompt)) and old[common] == prompt[common]:
            common += 1
        self.reused.append((session_id, common))
        ctx = list(prompt)
        self.sessions[session_id] = ctx
        return self._gen(session_id, ctx, params)

    def _gen(self, session_id: str, ctx: list[int], params: GenParams) -> Iterator[TokenEvent]:
        self.busy.add(session_id)
        try:
            text = ""
            for i in range(params.max_tokens):
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError(f"fake failure after {i} tokens")
                if self.delay:
                    time.sleep(self.delay)
                tok = next_token(ctx)
                ctx.append(tok)
                self.generated += 1
                piece = decode([tok])
                text += piece
                stop = any(s and text.endswith(s) for s in params.stop)
                last = stop or i == params.max_tokens - 1
                yield TokenEvent(tok, piece, -0.1 * (tok % 7 + 1),
                                 ("stop" if stop else "length") if last else None)
                if stop:
                    return
        finally:
            self.busy.discard(session_id)

    def close_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def export_session(self, session_id: str) -> dict:
        if session_id in self.busy:  # as the real node: not while a stream is still open
            raise SessionBusy(f"session {session_id}: still generating")
        toks = self.sessions[session_id]
        return {"session": session_id, "tokens": list(toks), "kv": bytes(toks)}

    def import_session(self, state: dict) -> str:
        sid = str(state["session"])
        self.sessions[sid] = [int(t) for t in state["tokens"]]
        return sid


class FakeFrontend:
    """Placement front end: `score` favours group k when the text contains
    "topic<k>"; otherwise a hash of the text picks the best group. Fixed
    scores can be forced with `fixed`."""

    def __init__(self, n_groups: int = 3, model_id: str = MODEL, manifest_hash: str = HASH,
                 fixed: dict[int, float] | None = None):
        self.manifest = SimpleNamespace(model_id=model_id, hash=manifest_hash, n_groups=n_groups)
        self.fixed = fixed
        self.score_calls = 0

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(messages)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, tokens: list[int]) -> str:
        return decode(tokens)

    def score(self, tokens: list[int]) -> PlacementScores:
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
                 **router_kw):
        super().__init__()
        self.engines, self.key = engines, key
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
            self.nodes.append(await start_node(e, self.key, "127.0.0.1", 0, advertise=False, name=f"node{i}"))
        router = Router(self.frontend, self.key, static_peers=[n.url for n in self.nodes], mdns=False,
                        **self.router_kw)
        self.running = await start_router(router, "127.0.0.1", 0, page=render)

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


if __name__ == "__main__":
    _main()
