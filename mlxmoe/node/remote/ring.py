"""The `experts` op over mx.distributed, for nodes started as one group (the ring
backend over TCP; JACCL over Thunderbolt 5 RDMA): `RingLink` has PeerLink's call
interface, so a Route uses either; HTTP (PeerLink) stays for control, discovery,
failover and as the fallback (`FallbackLink`).

A message is a fixed header of int32 (kind, layer, rows, width, dtype, n_ids)
followed by the hidden states and, for split, the expert ids and their rows.
mx.distributed has no probe, so one reader thread per peer receives everything
that peer sends: answers wake the waiting caller, requests go to the engine's
Inbox (the engine thread computes them, as for HTTP, and sends the answer), so
two nodes calling each other never deadlock. The ring's connections are not
signed: only nodes given one hostfile at start join it (docs/SECURITY.md's
cluster key does not cover it), so use it on a private link."""

from __future__ import annotations

import os
import queue
import select
import threading
import time

import mlx.core as mx

from mlxmoe import wire
from mlxmoe.errors import PeerError
from mlxmoe.node.remote.peers import CALL_TIMEOUT_S, Inbox

REQUEST, ANSWER, FAILED, STOP = 1, 2, 3, 9
DTYPES = [mx.bfloat16, mx.float16, mx.float32]
HEADER = 6


class RingGroup:
    """This node's side of the group: a reader per peer, and `serve(body) -> body`
    (the engine's experts op on wire dicts), run on the engine thread via `inbox`."""

    def __init__(self, group, serve, inbox: Inbox):
        self.g, self.serve, self.inbox = group, serve, inbox
        self.rank = group.rank()
        self.answers = {p: queue.Queue() for p in range(group.size()) if p != self.rank}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.bytes = 0
        for p in self.answers:
            threading.Thread(target=self._reader, args=(p,), daemon=True, name=f"ring-reader-{p}").start()

    def link(self, rank: int, name: str | None = None) -> "RingLink":
        return RingLink(self, rank, name or f"rank {rank}")

    def stop(self) -> None:
        """Tell every peer's reader of ours to end (ours end when the peers stop)."""
        for p in self.answers:
            self._send(p, STOP, 0, None)

    # -- one message: header, then the payload arrays (sent from the engine thread)
    def _send(self, peer: int, kind: int, layer: int, x, ids=None, rows=None) -> None:
        n_ids = 0 if ids is None else len(ids)
        shape = (0, 0) if x is None else x.shape
        dt = 0 if x is None else DTYPES.index(x.dtype)
        parts = [mx.array([kind, layer, shape[0], shape[1], dt, n_ids], mx.int32)]
        parts += [x] if x is not None else []
        parts += [mx.array([*ids, *rows], mx.int32)] if n_ids else []
        for a in parts:  # one at a time: sends evaluated together may leave in any order
            mx.eval(mx.distributed.send(a, peer, group=self.g))
        self.bytes += sum(a.nbytes for a in parts[1:])
        self.bytes += 4 * HEADER

    def _reader(self, peer: int) -> None:
        stream = mx.new_stream(mx.cpu)  # its own stream: a blocked recv holds up nothing else
        with mx.stream(stream):
            while True:
                h = mx.distributed.recv((HEADER,), mx.int32, peer, group=self.g)
                kind, layer, rows, width, dt, n_ids = h.tolist()
                if kind == STOP:
                    return
                x = mx.distributed.recv((rows, width), DTYPES[dt], peer, group=self.g) if rows else None
                ids = mx.distributed.recv((2 * n_ids,), mx.int32, peer, group=self.g).tolist() if n_ids else None
                mx.eval(*(a for a in (x,) if a is not None))
                if kind == REQUEST:
                    self.inbox.submit(lambda p=peer, l=layer, x=x, i=ids: self._answer(p, l, x, i))
                else:
                    self.answers[peer].put((kind, x))
                    os.write(self._wake_w, b"x")

    def _answer(self, peer: int, layer: int, x, ids) -> None:
        body = {"layer": layer, "x": wire.encode_tensor(x)}
        if ids:
            body["ids"], body["rows"] = ids[:len(ids) // 2], ids[len(ids) // 2:]
        try:
            y = wire.decode_tensor(self.serve(body)["y"])
        except Exception:  # the caller gets FAILED and raises PeerError naming us
            return self._send(peer, FAILED, layer, None)
        self._send(peer, ANSWER, layer, y)


class RingLink:
    """PeerLink's `call` for the experts op, to one rank of the group (engine thread only)."""

    def __init__(self, ring: RingGroup, rank: int, name: str, timeout: float = CALL_TIMEOUT_S):
        self.ring, self.rank, self.name, self.timeout = ring, rank, name, timeout

    def call(self, op: str, body: dict) -> tuple[dict, int]:
        if op != "experts":
            raise PeerError(f"peer {self.name}: the ring carries only the experts op, not {op!r}", self.name)
        x = wire.decode_tensor(body["x"])
        before = self.ring.bytes
        self.ring._send(self.rank, REQUEST, body["layer"], x, body.get("ids"), body.get("rows"))
        kind, y = self._wait()
        if kind != ANSWER:
            raise PeerError(f"peer {self.name}: experts failed on the ring", self.name)
        return {"y": wire.encode_tensor(y)}, self.ring.bytes - before + y.nbytes + 4 * HEADER

    def _wait(self):
        """Until our answer arrives; meanwhile serve the engine's inbox (peers' requests)."""
        answers, deadline = self.ring.answers[self.rank], time.monotonic() + self.timeout
        while True:
            try:
                return answers.get_nowait()
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"peer {self.name}: no experts answer on the ring in {self.timeout:.0f}s", self.name)
            ready, _, _ = select.select([self.ring._wake_r, self.ring.inbox], [], [], left)
            if self.ring._wake_r in ready:
                try:
                    os.read(self.ring._wake_r, 1 << 12)
                except BlockingIOError:
                    pass
            if self.ring.inbox in ready:
                self.ring.inbox.drain()

    def close(self) -> None:
        pass


class FallbackLink:
    """The ring while it answers, HTTP (a PeerLink) from the first ring failure on."""

    def __init__(self, ring: RingLink, http):
        self.ring, self.http, self.name = ring, http, http.name

    def call(self, op: str, body: dict) -> tuple[dict, int]:
        if self.ring is not None and op == "experts":
            try:
                return self.ring.call(op, body)
            except PeerError:
                self.ring = None
        return self.http.call(op, body)

    def close(self) -> None:
        self.http.close()
