"""Connection limits aiohttp has no option for, shared by the router's API and
the node server (docs/SECURITY.md, "Connections").

Every connection is counted from the moment it is accepted, before TLS and
before its headers: at most `per_address` from one peer address and
`max_connections` in all (fewer if the process's file descriptors are short:
`descriptor_cap`). At either bound a new connection evicts the oldest one that
never sent a request (then the oldest idle one); one in the middle of a request
is never evicted, and when none can go the new one is refused. So a flood of
idle or slow connections, from one address or many, costs a bounded number of
descriptors and a little memory, and a real client still gets in. A connection
is only watched until it speaks: TLS state (asyncio keeps a 256 KiB buffer per
TLS connection) and aiohttp's handler come once it sends its first bytes, and
the handshake is bounded in time; a connection whose first request's headers
are not complete `header_timeout` after its accept is closed. Refusals, evictions and timeouts are counted and logged as one summary
line per interval, never a line per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections import Counter
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("mlxmoe.limits")
FD_RESERVE = 128  # descriptors kept for the process's own links (peers, Bonjour, files)
LOG_EVERY_S = 10.0
SWEEP_EVERY_S = 1.0


@dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    per_address: int = 64
    tls_timeout: float = 10.0  # handshake, from accept
    header_timeout: float = 10.0  # from accept to the first request's complete headers


def descriptor_cap(wanted: int) -> int:
    """`wanted`, or fewer when the process may not open that many more files:
    the soft limit is raised to the hard one first (macOS starts at 256)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class _Conn:
    """One accepted connection: a raw socket the loop watches until it speaks, then aiohttp's."""

    __slots__ = ("sock", "address", "since", "transport", "handler", "task")

    def __init__(self, sock: socket.socket, address: str, since: float):
        self.sock, self.address, self.since = sock, address, since
        self.transport = self.handler = self.task = None  # task: handing it to aiohttp (the TLS handshake)

    def closed(self) -> bool:
        if self.transport is not None:
            return self.transport.is_closing()
        return self.sock.fileno() < 0 or (self.task is not None and self.task.done())

    def served(self) -> bool:
        """It sent at least one request's headers (aiohttp counts them)."""
        return self.handler is not None and getattr(self.handler, "_request_count", 0) > 0

    def busy(self) -> bool:
        return self.handler is not None and getattr(self.handler, "_request_in_progress", False)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            return
        if self.task is not None:  # asyncio owns the socket now: cancelling the handshake closes it
            self.task.cancel()
            return
        fd = self.sock.fileno()
        if fd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(fd)
            except RuntimeError:  # no loop: nothing watches it
                pass
            self.sock.close()


class Guard:
    """The connections of one listening site, oldest first (bookkeeping; it closes, never reads)."""

    def __init__(self, limits: Limits, name: str):
        self.limits, self.name = limits, name
        self.cap = descriptor_cap(limits.max_connections)
        self.conns: dict[int, _Conn] = {}
        self.events: Counter = Counter()  # since the last summary line
        self.totals: Counter = Counter()
        self._logged = time.monotonic()

    def _prune(self) -> None:
        for k in [k for k, c in self.conns.items() if c.closed()]:
            del self.conns[k]

    def admit(self, sock: socket.socket, address: str, now: float | None = None) -> _Conn | None:
        """Count a just-accepted connection, evicting for it at a bound; None: refuse it."""
        self._prune()
        mine = [c for c in self.conns.values() if c.address == address]
        if len(mine) >= self.limits.per_address and not self._evict(mine, "evicted (per address)"):
            return self._note("refused (per address)")
        if len(self.conns) >= self.cap and not self._evict(list(self.conns.values()), "evicted (total)"):
            return self._note("refused (total)")
        c = self.conns[id(sock)] = _Conn(sock, address, time.monotonic() if now is None else now)
        return c

    def _evict(self, conns: list[_Conn], kind: str) -> bool:
        idle = [c for c in conns if not c.busy()]
        victim = next((c for c in idle if not c.served()), None) or (idle[0] if idle else None)
        if victim is None:
            return False
        victim.close()
        self.conns.pop(id(victim.sock), None)
        self._note(kind)
        return True

    def sweep(self, now: float | None = None) -> None:
        """Close connections whose first request is not in after header_timeout; log a summary."""
        now = time.monotonic() if now is None else now
        self._prune()
        for c in [c for c in self.conns.values() if not c.served() and not c.busy()
                  and now - c.since > self.limits.header_timeout]:
            c.close()
            self.conns.pop(id(c.sock), None)
            self._note("closed before their first request's headers")
        if now - self._logged >= LOG_EVERY_S:
            if self.events:
                log.warning("%s connections in the last %.0fs: %s (open: %d, cap %d, %d per address)", self.name,
                            now - self._logged, ", ".join(f"{n} {k}" for k, n in sorted(self.events.items())),
                            len(self.conns), self.cap, self.limits.per_address)
                self.events.clear()
            self._logged = now

    def _note(self, kind: str) -> None:
        self.events[kind] += 1
        self.totals[kind] += 1

    def close_all(self) -> None:
        for c in list(self.conns.values()):
            if c.transport is None:
                c.close()
        self._prune()


def _close_unowned(c: _Conn) -> None:
    """After a hand-over that never made a transport (cancelled before it began, or failed), the
    raw socket is still ours to close (asyncio closed it itself if it had made one)."""
    if c.transport is None and c.sock.fileno() >= 0:
        c.sock.close()


class _Listening:
    """What aiohttp's runner reads of a site's server: its sockets, and close()."""

    def __init__(self, sock: socket.socket):
        self.sockets = [sock]

    def close(self) -> None:
        for s in self.sockets:
            s.close()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with `Guard` in front of every connection: it accepts
    the sockets itself and hands each to aiohttp (with TLS, when asked) only
    once the client has spoken."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context=None,
                 limits: Limits = Limits(), name: str = "server", backlog: int = 128):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host, self.port, self.runner = host, port, runner
        self.guard = Guard(limits, name)
        self.tasks: set = set()

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        sock = socket.create_server((self.host, self.port), backlog=self._backlog)
        sock.setblocking(False)
        self._server = _Listening(sock)
        self.port = sock.getsockname()[1]
        self._spawn(self._accept(sock))
        self._spawn(self._sweep())

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as e:  # out of descriptors, a reset before accept: count it, go on
                self.guard._note(f"accept failed ({type(e).__name__})")
                await asyncio.sleep(0.05)
                continue
            sock.setblocking(False)
            c = self.guard.admit(sock, peer[0] if isinstance(peer, tuple) else str(peer))
            if c is None:
                sock.close()
            elif self._ssl_context is None:
                self._hand_over(c)
            else:  # watched until it speaks
                loop.add_reader(sock.fileno(), self._spoke, c)

    def _spoke(self, c: _Conn) -> None:
        asyncio.get_running_loop().remove_reader(c.sock.fileno())
        try:
            said = c.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            said = b"?"  # spuriously readable: let TLS wait for it
        except OSError:
            said = b""
        if not said:  # it hung up without a word: no TLS state for it
            c.sock.close()
            return
        self._hand_over(c)

    def _hand_over(self, c: _Conn) -> None:
        c.task = self._spawn(self._serve(c))
        c.task.add_done_callback(lambda t: asyncio.get_running_loop().call_soon(_close_unowned, c))

    async def _serve(self, c: _Conn) -> None:
        handler = self.runner.server()
        try:
            kw = {"ssl": self._ssl_context, "ssl_handshake_timeout": self.guard.limits.tls_timeout} \
                if self._ssl_context is not None else {}
            c.transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: handler, c.sock, **kw)
        except Exception:  # no certificate, another CA, a timeout, a reset: refused, quietly (counted)
            c.sock.close()
            self.guard._note("TLS handshakes failed" if self._ssl_context is not None else "failed at start")
            return  # (an eviction cancels the task instead: counted as such)
        c.handler, c.task = handler, None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self.guard.sweep()

    async def stop(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        self.guard.close_all()
        await super().stop()
