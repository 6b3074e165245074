"""cluster/limits.Guard: who is evicted, refused or closed at the connection bounds (no server)."""

from __future__ import annotations

import logging
import socket

import pytest

from mlxmoe.cluster import limits
from mlxmoe.cluster.limits import Guard, Limits


class Handler:
    """What the guard reads of aiohttp's RequestHandler."""

    def __init__(self, served: int = 0, busy: bool = False):
        self._request_count, self._request_in_progress = served, busy


@pytest.fixture
def socks():
    made = []

    def make():
        a, b = socket.socketpair()
        made.extend([a, b])
        return a
    yield make
    for s in made:
        s.close()


def guard(**kw) -> Guard:
    return Guard(Limits(**{"max_connections": 4, "per_address": 3, **kw}), "test")


def test_a_new_connection_evicts_the_oldest_that_never_spoke_first(socks):
    g = guard()
    a, b, c = (g.admit(socks(), "10.0.0.1", now=t) for t in (1, 2, 3))
    a.handler = Handler(served=1)  # served, idle (keep-alive)
    b.handler = Handler(served=0)  # in its headers
    d = g.admit(socks(), "10.0.0.1", now=4)
    assert d is not None and b.sock.fileno() < 0 and a.sock.fileno() >= 0 and c.sock.fileno() >= 0
    assert g.totals == {"evicted (per address)": 1}


def test_busy_connections_are_never_evicted_and_then_the_new_one_is_refused(socks):
    g = guard()
    for c in [g.admit(socks(), "10.0.0.1", now=t) for t in range(3)]:
        c.handler = Handler(served=1, busy=True)
    assert g.admit(socks(), "10.0.0.1") is None and g.totals == {"refused (per address)": 1}
    assert g.admit(socks(), "10.0.0.2") is not None  # another address still gets in


def test_the_total_cap_evicts_across_addresses(socks):
    g = guard()
    first = [g.admit(socks(), f"10.0.0.{i}", now=i) for i in range(4)]
    assert g.admit(socks(), "10.0.0.9", now=9) is not None
    assert first[0].sock.fileno() < 0 and g.totals == {"evicted (total)": 1} and len(g.conns) == 4


def test_closed_connections_free_their_place(socks):
    g = guard()
    cs = [g.admit(socks(), "10.0.0.1") for _ in range(3)]
    cs[0].sock.close()
    assert g.admit(socks(), "10.0.0.1") is not None and not g.totals


def test_sweep_closes_connections_without_headers_and_logs_one_line(socks, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="mlxmoe.limits")
    monkeypatch.setattr(limits, "LOG_EVERY_S", 10.0)
    g = guard(header_timeout=5.0, max_connections=100, per_address=100)
    g._logged = 0.0
    slow = [g.admit(socks(), "10.0.0.1", now=0.0) for _ in range(50)]
    kept = g.admit(socks(), "10.0.0.1", now=0.0)
    kept.handler = Handler(served=1)
    g.sweep(now=4.0)
    assert all(c.sock.fileno() >= 0 for c in slow)
    g.sweep(now=11.0)
    assert all(c.sock.fileno() < 0 for c in slow) and kept.sock.fileno() >= 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "50 closed before their first request's headers" in lines[0]


def test_the_cap_leaves_descriptors_for_the_process():
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits.descriptor_cap(10) == 10
    assert limits.descriptor_cap(10 ** 9) <= max(1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - limits.FD_RESERVE)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft  # raised towards the hard limit, never lowered
