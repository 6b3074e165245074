"""FallbackLink (node/remote/ring.py): the ring for the small experts calls it carries,
HTTP for the rest and for good after the ring fails; Inbox.wake runs the node server's waker."""

from mlxmoe.errors import PeerError
from mlxmoe.node.remote.peers import Inbox
from mlxmoe.node.remote.ring import MAX_RING_BYTES, FallbackLink, RingLink


class Link:
    def __init__(self, name, fail=False):
        self.name, self.fail, self.calls = name, fail, 0

    def call(self, op, body):
        self.calls += 1
        if self.fail:
            raise PeerError(f"peer {self.name}: gone", self.name)
        return {"y": self.name}, 1


class Ring(Link):
    carries = staticmethod(RingLink.carries)


def body(nbytes):
    return {"layer": 0, "x": {"dtype": "bf16", "shape": [1, nbytes // 2], "data": b"\0" * nbytes}}


def test_small_experts_calls_take_the_ring_the_rest_http():
    ring, http = Ring("ring"), Link("http")
    link = FallbackLink(ring, http)
    assert link.call("experts", body(512))[0] == {"y": "ring"}
    assert link.call("experts", body(MAX_RING_BYTES + 2))[0] == {"y": "http"}  # a prompt chunk
    assert link.call("info", {"x": {"data": b""}})[0] == {"y": "http"}
    assert (ring.calls, http.calls) == (1, 2) and link.name == "http"


def test_a_failed_ring_hands_over_to_http_for_good():
    ring, http = Ring("ring", fail=True), Link("http")
    link = FallbackLink(ring, http)
    assert link.call("experts", body(512))[0] == {"y": "http"}
    assert link.call("experts", body(512))[0] == {"y": "http"}
    assert (ring.calls, http.calls) == (1, 2)


def test_inbox_wake_runs_the_waker_if_any():
    inbox, woken = Inbox(), []
    inbox.wake()  # no waker: nothing happens
    inbox.waker = lambda: woken.append(1)
    inbox.submit(lambda: 42)
    inbox.wake()
    assert woken == [1]
    inbox.drain()
