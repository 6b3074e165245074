"""Floods of idle and slow connections against a node (mutual TLS) and the router, on loopback, in
bounded loops: real chats are still served within about twice their usual time, descriptors and
memory come back, and the logs get one summary line per interval, not one line per connection."""

from __future__ import annotations

import logging
import socket
import threading
import time

import openai
import psutil
import pytest

from fakes import FakeEngine, LocalCluster
from mlxmoe.cluster.api.app import HttpLimits
from mlxmoe.cluster.limits import Limits

pytestmark = pytest.mark.timeout(120)
FLOOD = 400  # idle connections per target (the cap is 256 in all, 64 per address)


def chat_seconds(c: LocalCluster) -> float:
    cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="x", max_retries=0, timeout=20)
    t0 = time.perf_counter()
    r = cl.chat.completions.create(model="fake-moe", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    assert r.choices[0].finish_reason == "length"
    return time.perf_counter() - t0


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].rsplit(":", 1)
    return host, int(port)


def open_idle(url: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        out.append(socket.create_connection(address(url), timeout=5))
    return out


def test_idle_floods_leave_chats_served_and_descriptors_and_memory_flat(caplog):
    caplog.set_level(logging.WARNING, logger="mlxmoe.limits")
    proc = psutil.Process()
    with LocalCluster([FakeEngine(group=0, delay=0.002)]) as c:
        usual = min(chat_seconds(c) for _ in range(3))
        fds, rss = proc.num_fds(), proc.memory_info().rss
        for url in (c.node_url(0), c.api_url):  # a node (TLS, cluster members only) and the router's API
            socks = open_idle(url, FLOOD)
            try:
                time.sleep(0.3)
                took = chat_seconds(c)
                assert took < 2 * usual + 0.5, (url, took, usual)
                # the server side holds at most its caps: the client's FLOOD sockets, and not many more
                assert proc.num_fds() - fds < FLOOD + 64 + 16
            finally:
                for s in socks:
                    s.close()
        deadline = time.time() + 5
        while proc.num_fds() > fds + 4 and time.time() < deadline:
            time.sleep(0.1)
        assert proc.num_fds() <= fds + 4
        assert proc.memory_info().rss - rss < 40e6  # no TLS state for connections that never spoke
        assert chat_seconds(c) < 2 * usual + 0.5
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 4 and all("connections in the last" in ln for ln in lines)


def test_slowloris_on_the_router_is_cut_off_and_chats_go_on():
    quick = HttpLimits(connections=Limits(header_timeout=1.5))
    with LocalCluster([FakeEngine(group=0, delay=0.002)], limits=quick) as c:
        usual = chat_seconds(c)
        stop, socks = time.time() + 4.0, []

        def loris():
            for _ in range(150):
                s = socket.create_connection(address(c.api_url), timeout=5)
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                socks.append(s)
            while time.time() < stop:
                for s in list(socks):
                    try:
                        s.sendall(b"X")
                    except OSError:
                        socks.remove(s)
                time.sleep(0.3)

        t = threading.Thread(target=loris)
        t.start()
        served = []
        while time.time() < stop:
            served.append(chat_seconds(c))
            time.sleep(0.2)
        t.join(10)
        for s in socks:
            s.close()
        cut = next(iter(c.running.runner.sites)).guard.totals
        assert cut["closed before their first request's headers"] >= 40 and cut["evicted (per address)"] >= 80
        assert len(served) >= 5 and max(served) < 2 * usual + 0.5


def test_a_tls_client_that_stalls_in_the_handshake_is_closed():
    with LocalCluster([FakeEngine(group=0)]) as c:
        site = next(iter(c.nodes[0].runner.sites))
        site.guard.limits = Limits(tls_timeout=0.5, header_timeout=30)
        s = socket.create_connection(address(c.node_url(0)), timeout=5)
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        s.settimeout(5)
        t0 = time.time()
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.time() - t0 < 3
        s.close()
        deadline = time.time() + 3
        while not site.guard.totals["TLS handshakes failed"] and time.time() < deadline:
            time.sleep(0.05)
        assert site.guard.totals["TLS handshakes failed"] == 1
