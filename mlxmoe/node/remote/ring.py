"""The `experts` op over mx.distributed, for nodes started as one group (the ring
backend over TCP; JACCL over Thunderbolt 5 RDMA): `RingLink` has PeerLink's call
interface, so a Route can use either; HTTP (PeerLink) stays for control, discovery,
failover, large prompt chunks and as the fallback (`FallbackLink`).

mx.distributed has no probe and MLX may not evaluate on two threads at once (both
were tried: a reader thread blocked in `recv` crashes the engine thread's next
evaluation), so only the engine thread touches MLX. Each message's 24-byte header
(kind, layer, rows, width, dtype, ids) goes first over a plain TCP control socket
per peer, which a thread without MLX watches; the hidden states follow over
mx.distributed. The engine thread handles headers strictly in arrival order (the
payloads of one peer arrive in that order): a request is received, computed and
answered; an answer completes the waiting call. The control sockets and the ring
are not signed: only nodes given one hostfile at start join (docs/SECURITY.md, Known gaps)."""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import mlx.core as mx

from mlxmoe import wire
from mlxmoe.errors import PeerError
from mlxmoe.node.remote.peers import CALL_TIMEOUT_S, Inbox

REQUEST, ANSWER, FAILED = 1, 2, 3
DTYPES = [mx.bfloat16, mx.float16, mx.float32]
HEADER = struct.Struct("<6i")
MAX_RING_BYTES = 256 << 10  # larger calls go over HTTP: two big sends crossing could both block


CONTROL_PORT_OFFSET = 100  # each rank's control socket: its ring address, port + this


def control_addrs(hostfile: str) -> list[tuple[str, int]]:
    """Every rank's control address, from the ring's hostfile (JSON list of "ip:port")."""
    hosts = json.loads(Path(hostfile).read_text())
    return [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]) + CONTROL_PORT_OFFSET) for h in hosts]


def join(node, hostfile: str, rank: int) -> RingGroup:
    """Make `node` (engine thread) rank `rank` of the group in `hostfile`; every rank starts together."""
    os.environ["MLX_RANK"], os.environ["MLX_HOSTFILE"] = str(rank), hostfile
    group = mx.distributed.init(backend="ring", strict=True)

    def serve(body):
        return {"y": node.experts(body["layer"], body["x"], body.get("ids"), body.get("rows"))}

    node.remote.ring = RingGroup(group, control_sockets(rank, control_addrs(hostfile)), serve, node.inbox)
    return node.remote.ring


def control_sockets(rank: int, addrs: list[tuple[str, int]], timeout: float = 30.0) -> dict[int, socket.socket]:
    """One TCP connection to every other rank: listen, dial the higher ranks, accept the lower."""
    srv = socket.create_server(addrs[rank], reuse_port=False)
    srv.settimeout(timeout)
    socks, deadline = {}, time.monotonic() + timeout
    for peer in range(rank + 1, len(addrs)):
        while True:
            try:
                s = socket.create_connection(addrs[peer], timeout=timeout)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.sendall(struct.pack("<i", rank))
        socks[peer] = s
    for _ in range(rank):
        s, _ = srv.accept()
        socks[struct.unpack("<i", _read(s, 4))[0]] = s
    srv.close()
    for s in socks.values():
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return socks


def _read(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("control socket closed")
        buf += chunk
    return buf


class RingGroup:
    """This node's side of the group: `serve(body) -> body` is the engine's experts op
    on wire dicts, run on the engine thread via `inbox`, like an HTTP request's."""

    def __init__(self, group, socks: dict[int, socket.socket], serve, inbox: Inbox):
        self.g, self.socks, self.serve, self.inbox = group, socks, serve, inbox
        self.pending = {p: collections.deque() for p in socks}  # headers not yet handled, per peer
        self.results: dict[int, tuple] = {}
        self.bytes = self.served = 0
        self.lost: set[int] = set()
        for p in socks:
            threading.Thread(target=self._watch, args=(p,), daemon=True, name=f"ring-control-{p}").start()

    def link(self, rank: int, name: str | None = None) -> "RingLink":
        return RingLink(self, rank, name or f"rank {rank}")

    def _watch(self, peer: int) -> None:
        """Headers from one peer, queued in order; the engine thread is woken through the inbox."""
        try:
            while True:
                self.pending[peer].append(HEADER.unpack(_read(self.socks[peer], HEADER.size)))
                self.inbox.submit(self.pump)
                self.inbox.wake()
        except (OSError, ConnectionError):
            self.lost.add(peer)
            self.inbox.submit(lambda: None)  # wake a waiting caller

    def send(self, peer: int, kind: int, layer: int, x=None, ids=None, rows=None) -> int:
        """Header over the control socket, then the arrays over mx.distributed (engine thread)."""
        n_ids = len(ids) if ids else 0
        rows_, width = x.shape if x is not None else (0, 0)
        dt = DTYPES.index(x.dtype) if x is not None else 0
        self.socks[peer].sendall(HEADER.pack(kind, layer, rows_, width, dt, n_ids))
        parts = ([x] if x is not None else []) + ([mx.array([*ids, *rows], mx.int32)] if n_ids else [])
        for a in parts:  # one at a time: sends evaluated together may leave in any order
            mx.eval(mx.distributed.send(a, peer, group=self.g))
        n = HEADER.size + sum(a.nbytes for a in parts)
        self.bytes += n
        return n

    def pump(self) -> None:
        """Handle every queued header in order (engine thread)."""
        for peer, q in self.pending.items():
            while q:
                kind, layer, rows, width, dt, n_ids = q.popleft()
                x = self._recv((rows, width), DTYPES[dt], peer) if rows else None
                ids = self._recv((2 * n_ids,), mx.int32, peer) if n_ids else None
                if kind == REQUEST:
                    self._answer(peer, layer, x, ids.tolist() if ids is not None else None)
                else:
                    self.results[peer] = (kind, x)

    def _recv(self, shape, dtype, peer: int):
        a = mx.distributed.recv(shape, dtype, peer, group=self.g)
        mx.eval(a)  # one at a time, like the sends: in order
        return a

    def _answer(self, peer: int, layer: int, x, ids) -> None:
        body = {"layer": layer, "x": wire.encode_tensor(x)}
        if ids:
            body["ids"], body["rows"] = ids[:len(ids) // 2], ids[len(ids) // 2:]
        try:
            y = wire.decode_tensor(self.serve(body)["y"])
        except Exception:  # the caller raises PeerError naming this node
            self.send(peer, FAILED, layer)
            return
        self.send(peer, ANSWER, layer, y)
        self.served += 1


class RingLink:
    """PeerLink's `call` for the experts op, to one rank of the group (engine thread only)."""

    def __init__(self, ring: RingGroup, rank: int, name: str, timeout: float = CALL_TIMEOUT_S):
        self.ring, self.rank, self.name, self.timeout = ring, rank, name, timeout

    @staticmethod
    def carries(op: str, body: dict) -> bool:
        return op == "experts" and len(body["x"]["data"]) <= MAX_RING_BYTES

    def call(self, op: str, body: dict) -> tuple[dict, int]:
        if not self.carries(op, body):
            raise PeerError(f"peer {self.name}: the ring carries only experts calls up to {MAX_RING_BYTES} bytes",
                            self.name)
        x = wire.decode_tensor(body["x"])
        if self.rank in self.ring.lost:
            raise PeerError(f"peer {self.name}: its control connection is closed", self.name)
        n = self.ring.send(self.rank, REQUEST, body["layer"], x, body.get("ids"), body.get("rows"))
        kind, y = self._wait()
        if kind != ANSWER:
            raise PeerError(f"peer {self.name}: experts failed on the ring", self.name)
        return {"y": wire.encode_tensor(y)}, n + HEADER.size + y.nbytes

    def _wait(self):
        """Until our answer is in; meanwhile the inbox serves peers (their requests, our headers)."""
        deadline = time.monotonic() + self.timeout
        while self.rank not in self.ring.results:
            if self.rank in self.ring.lost:
                raise PeerError(f"peer {self.name}: lost while we waited", self.name)
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"peer {self.name}: no experts answer on the ring in {self.timeout:.0f}s", self.name)
            select.select([self.ring.inbox], [], [], left)
            self.ring.inbox.drain()
        return self.ring.results.pop(self.rank)

    def close(self) -> None:
        pass


class FallbackLink:
    """The ring for what it carries, HTTP (a PeerLink) for the rest; after a ring failure, HTTP only."""

    def __init__(self, ring: RingLink, http):
        self.ring, self.http, self.name = ring, http, http.name

    def call(self, op: str, body: dict) -> tuple[dict, int]:
        if self.ring is not None and self.ring.carries(op, body):
            try:
                return self.ring.call(op, body)
            except PeerError:
                self.ring = None
        return self.http.call(op, body)

    def close(self) -> None:
        self.http.close()
