"""Node-to-node links for remote experts: one persistent signed HTTP
connection per peer, called from the engine thread, which serves other
nodes' requests (the Inbox) while it waits. Every byte is built and checked
by mlxmoe/wire.py (shared with the router's NodeClient); this module is only
the blocking transport."""

from __future__ import annotations

import collections
import http.client
import os
import select
import ssl
import time
import urllib.parse
from concurrent.futures import Future

from mlxmoe import wire
from mlxmoe.errors import PeerError

CALL_TIMEOUT_S = 30.0  # below the router's 60 s token timeout: the peer is named, not this node
_client_context: ssl.SSLContext | None = None


def set_client_context(ctx: ssl.SSLContext | None) -> None:
    """This process's mutual-TLS client context (cluster CA + this Mac's
    certificate, set by the node server): every https:// peer is dialled with
    it; without one an https:// peer is refused rather than dialled with
    system roots (docs/SECURITY.md)."""
    global _client_context
    _client_context = ctx


class Inbox:
    """Experts requests from other nodes, run on the engine thread: by the
    worker when idle, or by a PeerLink while it waits for its own answer."""

    def __init__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._jobs: collections.deque = collections.deque()
        self.served = 0  # experts requests run (info()["experts_served"])
        self.waker = None  # set by the node server: makes an idle engine drain (jobs from other threads)

    def fileno(self) -> int:
        return self._r

    def __del__(self):
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def submit(self, fn) -> Future:
        fut: Future = Future()
        self._jobs.append((fn, fut))
        try:
            os.write(self._w, b"x")
        except BlockingIOError:  # pipe full: a wake-up is pending anyway
            pass
        return fut

    def wake(self) -> None:
        """For a job submitted off the event loop (the ring's control thread): an idle engine runs it."""
        if self.waker is not None:
            self.waker()

    def drain(self) -> None:
        try:
            os.read(self._r, 1 << 12)
        except BlockingIOError:
            pass
        while self._jobs:
            fn, fut = self._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            self.served += 1
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)


class PeerLink:
    """A persistent, signed connection to one node's RPC (used from one thread)."""

    def __init__(self, url: str, key: bytes, manifest_hash: str | None, inbox: Inbox | None = None,
                 timeout: float = CALL_TIMEOUT_S, name: str | None = None, context: ssl.SSLContext | None = None):
        u = urllib.parse.urlsplit(url)
        self.url, self.key, self.mh, self.inbox, self.timeout = url.rstrip("/"), key, manifest_hash, inbox, timeout
        self.name, self.context = name or self.url, context
        self._https, self._host, self._port = u.scheme == "https", u.hostname, u.port
        self.conn: http.client.HTTPConnection | None = None
        self.dst: tuple[str, str] | None = None  # (node name, epoch) from /hello
        self.src = f"node@{os.getpid()}"  # we hold no sessions there: `held` never names us

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = self._new_connection()
        return self.conn

    def _exchange(self, method: str, path: str, data: bytes | None, headers: dict, wait: bool):
        """One request on the kept-alive connection, retried once on a fresh
        one if the kept-alive one turns out closed (ops are pure)."""
        for attempt in (0, 1):
            reused = self.conn is not None
            try:
                self._connect().request(method, path, body=data, headers=headers)
                if wait:
                    self._wait()
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError) as e:
                self.close()
                if not reused or attempt or isinstance(e, TimeoutError):  # a silent peer gets no second wait
                    what = path.rsplit("/", 1)[-1]  # the op, or "hello"
                    raise PeerError(f"peer {self.name}: '{what}' failed: {type(e).__name__}: {e}", self.name) from None
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return resp, raw

    def _hello(self) -> tuple[str, str]:
        resp, raw = self._exchange("GET", "/hello", None, {}, False)
        try:
            self.dst = wire.open_hello(raw)
        except wire.WireError as e:
            raise PeerError(f"peer {self.name}: {e.message}", self.name) from None
        return self.dst

    def call(self, op: str, body: dict) -> tuple[dict, int]:
        """(answer body, HTTP bytes sent + received of the call itself)."""
        for attempt in (0, 1):
            node, epoch = self.dst or self._hello()
            nonce = wire.new_nonce()
            data, headers = wire.encode_request(self.key, op, body, self.mh, nonce=nonce, dst=node, epoch=epoch,
                                                src=self.src)
            resp, raw = self._exchange("POST", f"/rpc/{op}", data, headers, True)
            err = wire.refusal(raw) if resp.status != 200 else {}
            if resp.status == 401 and err.get("code") in wire.REHELLO_CODES and not attempt:
                self.dst = None  # the peer restarted: ask again, once
                continue
            break
        if resp.status != 200:
            raise PeerError(f"peer {self.name}: '{op}' refused (HTTP {resp.status} {err.get('code', '')}): "
                            f"{err.get('message', '')}", self.name)
        try:
            body = wire.open_response(self.key, nonce, raw, resp.getheader(wire.AUTH_HEADER))
        except wire.WireError as e:
            raise PeerError(f"peer {self.name}: {e.message}", self.name) from None
        host = self._host if self._port is None else f"{self._host}:{self._port}"
        return body, _http_bytes(op, data, headers, host, resp, raw)

    def _new_connection(self) -> http.client.HTTPConnection:
        if not self._https:  # a TLS router hands out only https:// peers (discovery.PeerTable)
            return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        ctx = self.context or _client_context
        if ctx is None:
            raise PeerError(f"peer {self.name}: https peer but this node has no cluster certificate", self.name)
        return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=ctx)

    def _wait(self) -> None:
        """Until the answer starts arriving; meanwhile serve our own inbox."""
        if self.inbox is None:
            return
        sock, deadline = self.conn.sock, time.monotonic() + self.timeout
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # already decrypted: select would not see it
            return
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer in {self.timeout:.0f}s")
            ready, _, _ = select.select([sock, self.inbox], [], [], left)
            if sock in ready:
                return
            if ready:
                self.inbox.drain()


def _http_bytes(op, data, headers, host, resp, raw) -> int:
    """Bytes of one HTTP/1.1 exchange as sent (request line and headers as
    http.client writes them; the response's status line and headers)."""
    sent = {"Host": host, "Accept-Encoding": "identity", "Content-Length": str(len(data)), **headers}
    req = len(f"POST /rpc/{op} HTTP/1.1\r\n") + sum(len(k) + len(v) + 4 for k, v in sent.items()) + 2
    ans = len(f"HTTP/1.1 {resp.status} {resp.reason}\r\n") + sum(len(k) + len(v) + 4 for k, v in resp.getheaders()) + 2
    return req + len(data) + ans + len(raw)
