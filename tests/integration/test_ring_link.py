"""The experts op over mx.distributed (node/remote/ring.py) between two real ranks of a
ring on loopback: both call each other at once (each serves the other's requests
while it waits), answers are exact, a failing handler becomes PeerError, and the HTTP
fallback takes over from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def rank_main() -> None:
    import statistics
    import time

    import mlx.core as mx

    from mlxmoe import wire
    from mlxmoe.errors import PeerError
    from mlxmoe.node.remote.peers import Inbox
    from mlxmoe.node.remote.ring import FallbackLink, RingGroup, control_sockets

    g = mx.distributed.init(backend="ring", strict=True)
    ring_addrs = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
    addrs = [(a.split(":")[0], int(os.environ["CONTROL_PORT"]) + i) for i, a in enumerate(ring_addrs)]

    def serve(body):
        if body["layer"] == 99:
            raise RuntimeError("no such layer")
        x = wire.decode_tensor(body["x"])
        if "ids" in body:  # split: one output row per id, from the row it applies to
            x = x[mx.array(body["rows"])] + mx.array(body["ids"], mx.float32)[:, None].astype(x.dtype)
        return {"y": wire.encode_tensor(x * 2 + body["layer"])}

    ring = RingGroup(g, control_sockets(g.rank(), addrs), serve, Inbox())
    link = ring.link(1 - g.rank())
    times, ok = [], True
    for i in range(20):
        x = mx.full((1, 64), float(g.rank() + i), mx.bfloat16)
        t0 = time.perf_counter()
        y, n = link.call("experts", {"layer": 3, "x": wire.encode_tensor(x)})
        times.append(time.perf_counter() - t0)
        ok &= bool(mx.array_equal(wire.decode_tensor(y["y"]), x * 2 + 3))
    x = mx.arange(2 * 8, dtype=mx.float32).reshape(2, 8)
    y, _ = link.call("experts", {"layer": 1, "x": wire.encode_tensor(x), "ids": [5, 7, 9], "rows": [1, 0, 1]})
    split_ok = wire.decode_tensor(y["y"]).tolist() == (2 * (x[mx.array([1, 0, 1])] + mx.array([5, 7, 9])[:, None]) + 1).tolist()

    class Http:
        name = "http"

        def call(self, op, body):
            return {"y": "from http"}, 0

    failed = None
    try:
        link.call("experts", {"layer": 99, "x": wire.encode_tensor(mx.ones((1, 4)))})
    except PeerError as e:
        failed = str(e)
    fb = FallbackLink(link, Http())
    fb_answer = fb.call("experts", {"layer": 99, "x": wire.encode_tensor(mx.ones((1, 4)))})[0]
    # both ranks are done calling: serve what is left, then part
    for _ in range(50):
        ring.inbox.drain()
        time.sleep(0.02)
    print(json.dumps({"rank": g.rank(), "exact": ok, "split_exact": split_ok, "failed": failed,
                      "fallback": fb_answer, "bytes": n, "median_ms": 1e3 * statistics.median(times)}), flush=True)


def test_two_ranks_call_each_other(tmp_path):
    from fakes import free_ports

    hosts = tmp_path / "hosts.json"
    ports = free_ports(4)
    hosts.write_text(json.dumps([f"127.0.0.1:{p}" for p in ports[:2]]))
    env = {**os.environ, "MLX_HOSTFILE": str(hosts), "PYTHONPATH": str(ROOT), "CONTROL_PORT": str(ports[2])}
    procs = [subprocess.Popen([sys.executable, __file__], env={**env, "MLX_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for o in outs:
        assert o["exact"] and o["split_exact"], o
        assert "experts failed on the ring" in o["failed"] and o["fallback"] == {"y": "from http"}
        assert o["bytes"] == 2 * (24 + 64 * 2)  # header + one bf16 row, each way
        assert o["median_ms"] > 0


if __name__ == "__main__":
    rank_main()
