"""Bundle parts over the LAN (cluster/parts.py): a node serves its bundle's
files on GET /parts/{manifest_hash}/{name} over mutual TLS, signed like the
RPCs, with Range; a joining node fetches its part, resumable and verified."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeEngine
from mlxmoe import wire
from mlxmoe.bundle.copy import node_files
from mlxmoe.bundle.manifest import FILENAME, TRUNK_FILE, Manifest, group_file
from mlxmoe.cluster import parts, tls
from mlxmoe.cluster.node_server import start_node
from mlxmoe.errors import BundleError

KEY = b"p" * 32
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real split bundle of a tiny model: 3 groups, unquantized (files big enough to cut midway)."""
    import tiny
    from mlxmoe.bundle.split import split

    d = tmp_path_factory.mktemp("parts")
    src = tiny.make_checkpoint("qwen3_moe", d / "src", seed=3)
    split(str(src), d / "bundle", 3, bits=None, trunk_bits=None)
    return d / "bundle"


@pytest.fixture
def served(bundle, tmp_path):
    """A copy of the bundle a test may change (the node serves the copy)."""
    shutil.copytree(bundle, tmp_path / "served")
    return tmp_path / "served"


class BundleEngine(FakeEngine):
    """The fake engine, with the bundle a real node was loaded from."""

    def __init__(self, bundle_dir, group: int = 0):
        m = Manifest.load(bundle_dir)
        super().__init__(group=group, n_groups=m.n_groups, model_id=m.model_id, manifest_hash=m.hash)
        self.manifest, self.bundle_dir = m, str(bundle_dir)


def run(coro_fn, ident, engine, timeout=120):
    """Start a TLS node serving `engine`, run coro_fn(node, ctx), stop it."""
    async def main():
        node = await start_node(engine, KEY, "127.0.0.1", 0, advertise=False, tls=ident)
        try:
            return await coro_fn(node, tls.client_context(ident))
        finally:
            await node.stop()
    return asyncio.run(asyncio.wait_for(main(), timeout))


def parts_server(node) -> parts.PartsServer:
    return node.runner.app[parts.PARTS]


async def raw_get(node, ctx, name: str, headers: dict | None = None, sign_key: bytes | None = KEY, mh=None):
    """(status, headers, body) of one GET /parts request, signed with `sign_key` (None: unsigned)."""
    m = node.server.engine.manifest
    mh = mh or m.hash
    h = dict(headers or {})
    if sign_key is not None:
        h.update(parts.signed_headers(sign_key, mh, node.server.name, node.server.epoch))
    url = f"{node.url}/parts/{quote(mh, safe='')}/{quote(name, safe='')}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.get(url, headers=h) as resp:
            return resp.status, dict(resp.headers), await resp.read()


# ---------------------------------------------------------------- the whole part, from a real node

def test_a_joining_node_gets_its_files_identical_from_a_real_node(bundle, tmp_path, tls_identity):
    from mlxmoe.node.engine import Node

    m = Manifest.load(bundle)
    names = node_files(m, [1])
    seen = []

    async def t(node, ctx):
        got = await parts.fetch_manifest(node.url, m.hash, KEY, ctx)
        assert got.hash == m.hash
        return await parts.fetch_part(node.url, got, names, tmp_path / "n1", KEY, ctx, progress=seen.append)

    async def main():  # the real node: loaded by its factory on the engine thread, bundle_dir from Node.load
        node = await start_node(None, KEY, "127.0.0.1", 0, advertise=False, tls=tls_identity,
                                factory=lambda: Node.load(str(bundle), 0))
        try:
            return await t(node, tls.client_context(tls_identity))
        finally:
            await node.stop()
    stats = asyncio.run(asyncio.wait_for(main(), 240))
    dest = tmp_path / "n1"
    assert sorted(p.name for p in dest.iterdir()) == sorted(names + [FILENAME])  # no partials left, no other group
    for n in names:
        assert (dest / n).read_bytes() == (bundle / n).read_bytes(), n
    assert Manifest.load(dest).hash == m.hash
    assert group_file(0) not in names and group_file(1) in names
    total = sum(m.files[n]["size"] for n in names)
    assert stats["downloaded"] == total == stats["bytes"] and stats["reused"] == 0 and sum(seen) == total


def test_an_engine_without_a_bundle_serves_no_parts(tls_identity):
    async def t(node, ctx):
        status, _, body = await raw_get(node, ctx, TRUNK_FILE)
        return status, body
    status, body = run(t, tls_identity, FakeEngine(group=0))
    assert status == 404 and wire.refusal(body)["code"] == "not_found"


# ---------------------------------------------------------------- resume and verification

def test_a_transfer_cut_halfway_resumes_from_the_partial_file(served, tmp_path, tls_identity):
    m = Manifest.load(served)
    size = m.files[TRUNK_FILE]["size"]
    dest = tmp_path / "n"

    async def t(node, ctx):
        srv = parts_server(node)
        srv.cut_after = size // 2
        with pytest.raises(parts.PartsError, match="trunk.safetensors.*run again to resume"):
            await parts.fetch_part(node.url, m, [TRUNK_FILE], dest, KEY, ctx, retries=0)
        first_sent = srv.bytes_sent
        have = (dest / f".{TRUNK_FILE}.part").stat().st_size
        assert not (dest / TRUNK_FILE).exists() and not (dest / FILENAME).exists()  # not complete: no manifest
        stats = await parts.fetch_part(node.url, m, [TRUNK_FILE], dest, KEY, ctx, retries=0)
        return first_sent, have, stats, srv.bytes_sent
    first_sent, have, stats, all_sent = run(t, tls_identity, BundleEngine(served))
    assert 0 < have <= first_sent == size // 2
    assert stats["downloaded"] == size - have and stats["reused"] == have  # only the rest came over
    assert all_sent - first_sent == size - have
    assert (dest / TRUNK_FILE).read_bytes() == (served / TRUNK_FILE).read_bytes()
    assert not (dest / f".{TRUNK_FILE}.part").exists() and Manifest.load(dest).hash == m.hash


def test_a_cut_transfer_resumes_by_itself_within_its_retries(served, tmp_path, tls_identity):
    m = Manifest.load(served)
    names = node_files(m, [2])
    size = sum(m.files[n]["size"] for n in names)

    async def t(node, ctx):
        parts_server(node).cut_after = m.files[TRUNK_FILE]["size"] // 3
        return await parts.fetch_part(node.url, m, names, tmp_path / "n", KEY, ctx, retries=2), parts_server(node)
    stats, srv = run(t, tls_identity, BundleEngine(served))
    assert stats["downloaded"] == size and srv.bytes_sent == size  # nothing sent twice
    for n in names:
        assert (tmp_path / "n" / n).read_bytes() == (served / n).read_bytes()


def test_a_corrupted_partial_is_detected_and_downloaded_again(served, tmp_path, tls_identity):
    m = Manifest.load(served)
    data = (served / TRUNK_FILE).read_bytes()
    dest = tmp_path / "n"
    dest.mkdir()
    half = len(data) // 2
    bad = bytearray(data[:half])
    bad[100] ^= 0xFF
    (dest / f".{TRUNK_FILE}.part").write_bytes(bytes(bad))

    async def t(node, ctx):
        return await parts.fetch_part(node.url, m, [TRUNK_FILE], dest, KEY, ctx)
    stats = run(t, tls_identity, BundleEngine(served))
    assert (dest / TRUNK_FILE).read_bytes() == data
    assert stats["downloaded"] == (len(data) - half) + len(data)  # the rest, then all of it once the hash failed
    assert stats["reused"] == 0


def test_a_complete_file_that_does_not_match_is_fetched_again_and_a_good_one_kept(served, tmp_path, tls_identity):
    m = Manifest.load(served)
    names = [TRUNK_FILE, group_file(0)]
    dest = tmp_path / "n"
    dest.mkdir()
    shutil.copy(served / group_file(0), dest / group_file(0))  # already here, good
    (dest / TRUNK_FILE).write_bytes(b"\0" * m.files[TRUNK_FILE]["size"])  # same size, wrong bytes

    async def t(node, ctx):
        return await parts.fetch_part(node.url, m, names, dest, KEY, ctx)
    stats = run(t, tls_identity, BundleEngine(served))
    assert stats["downloaded"] == m.files[TRUNK_FILE]["size"] and stats["reused"] == m.files[group_file(0)]["size"]
    m.verify_files(dest, names)


def test_a_peer_whose_file_is_corrupt_gets_a_clear_error_and_leaves_nothing(served, tmp_path, tls_identity):
    m = Manifest.load(served)
    p = served / group_file(1)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    dest = tmp_path / "n"

    async def t(node, ctx):
        with pytest.raises(BundleError, match=r"experts-group-01\.safetensors .*sha256 does not match"):
            await parts.fetch_part(node.url, m, [group_file(1)], dest, KEY, ctx)
    run(t, tls_identity, BundleEngine(served))
    assert list(dest.iterdir()) == []


# ---------------------------------------------------------------- refusals

def test_a_request_without_the_cluster_keys_signature_gets_401_and_no_bytes(served, tls_identity):
    async def t(node, ctx):
        out = [await raw_get(node, ctx, TRUNK_FILE, sign_key=None),
               await raw_get(node, ctx, TRUNK_FILE, sign_key=b"x" * 32),
               await raw_get(node, ctx, TRUNK_FILE, {"Range": "bytes=0-"}, sign_key=None)]
        return out, parts_server(node).bytes_sent
    out, sent = run(t, tls_identity, BundleEngine(served))
    trunk = (served / TRUNK_FILE).read_bytes()
    for status, _, body in out:
        assert status == 401 and wire.refusal(body)["code"] == "unauthorized" and trunk[:64] not in body
    assert sent == 0


def test_a_signed_request_is_single_use(served, tls_identity):
    async def t(node, ctx):
        m = node.server.engine.manifest
        h = parts.signed_headers(KEY, m.hash, node.server.name, node.server.epoch)
        first = await raw_get(node, ctx, TRUNK_FILE, h, sign_key=None)
        again = await raw_get(node, ctx, TRUNK_FILE, h, sign_key=None)
        return first[0], again
    first, (status, _, body) = run(t, tls_identity, BundleEngine(served))
    assert first == 200 and status == 401 and wire.refusal(body)["code"] == "replay"


def test_names_outside_the_manifest_get_404(served, tls_identity):
    (served / "cluster.key").write_bytes(b"secret" * 8)  # even when such a file sits in the bundle directory
    (served / f".{TRUNK_FILE}.part").write_bytes(b"partial")
    names = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "cluster.key", f".{TRUNK_FILE}.part", "..", ".",
             "/etc/passwd", "trunk.safetensors/", "TRUNK.SAFETENSORS", ""]

    async def t(node, ctx):
        return [(n, await raw_get(node, ctx, n)) for n in names], parts_server(node).bytes_sent
    out, sent = run(t, tls_identity, BundleEngine(served))
    for n, (status, _, body) in out:
        assert status == 404, (n, status)
        assert b"secret" not in body and b"root:" not in body
    assert sent == 0


def test_another_manifest_hash_gets_409(served, tls_identity):
    async def t(node, ctx):
        return await raw_get(node, ctx, TRUNK_FILE, mh="0123456789abcdef")
    status, _, body = run(t, tls_identity, BundleEngine(served))
    assert status == 409 and wire.refusal(body)["code"] == "manifest_mismatch"


def test_ranges_and_the_manifest_itself(served, tls_identity):
    data = (served / TRUNK_FILE).read_bytes()
    n = len(data)

    async def t(node, ctx):
        return {r: await raw_get(node, ctx, TRUNK_FILE, {"Range": r} if r else None)
                for r in (None, "bytes=0-9", "bytes=10-", "bytes=-7", f"bytes={n - 3}-{n + 100}", f"bytes={n}-",
                          "bytes=0-1,5-6", "items=0-1", "bytes=9-3")}, await raw_get(node, ctx, FILENAME)
    out, man = run(t, tls_identity, BundleEngine(served))
    assert out[None][0] == 200 and out[None][2] == data
    assert out["bytes=0-9"][0] == 206 and out["bytes=0-9"][2] == data[:10]
    assert out["bytes=0-9"][1]["Content-Range"] == f"bytes 0-9/{n}"
    assert out["bytes=10-"][2] == data[10:] and out["bytes=-7"][2] == data[-7:]
    assert out[f"bytes={n - 3}-{n + 100}"][2] == data[-3:]
    for r in (f"bytes={n}-", "bytes=0-1,5-6", "items=0-1", "bytes=9-3"):
        assert out[r][0] == 416 and out[r][1]["Content-Range"] == f"bytes */{n}", r
    assert man[0] == 200 and man[2] == (served / FILENAME).read_bytes()


def test_past_two_transfers_a_node_says_429_and_a_client_waits(served, tmp_path, tls_identity, monkeypatch):
    monkeypatch.setattr(parts, "RETRY_AFTER_S", 1)
    m = Manifest.load(served)

    async def t(node, ctx):
        srv = parts_server(node)
        srv.active = srv.max_transfers  # two transfers in flight
        status, headers, _ = await raw_get(node, ctx, TRUNK_FILE)
        fetch = asyncio.ensure_future(parts.fetch_part(node.url, m, [TRUNK_FILE], tmp_path / "n", KEY, ctx))
        await asyncio.sleep(0.5)
        assert not fetch.done()
        srv.active = 0  # they ended
        stats = await fetch
        return status, headers, stats
    status, headers, stats = run(t, tls_identity, BundleEngine(served))
    assert status == 429 and headers["Retry-After"] == "1"
    assert stats["downloaded"] == m.files[TRUNK_FILE]["size"]


# ---------------------------------------------------------------- hypothesis: never a 5xx

class Background:
    """A node serving the bundle on a loop in another thread, for sync hypothesis tests."""

    def __init__(self, bundle_dir, ident):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ctx = tls.client_context(ident)
        self.node = self.call(start_node(BundleEngine(bundle_dir), KEY, "127.0.0.1", 0, advertise=False, tls=ident))

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.call(self.node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def background(bundle, tls_identity):
    b = Background(bundle, tls_identity)
    yield b
    b.stop()


range_headers = st.one_of(
    st.none(),
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 1 << 40), st.integers(0, 1 << 40)),
    st.builds(lambda a: f"bytes={a}-", st.integers(0, 1 << 70)),
    st.builds(lambda a: f"bytes=-{a}", st.integers(0, 1 << 70)),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    st.builds(lambda t: "bytes=" + t, st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)))
names = st.one_of(st.sampled_from([TRUNK_FILE, FILENAME, group_file(0), group_file(7), "config.json", "cluster.key",
                                   "../distribution.json", "%2e%2e", "..", "."]),
                  st.text(min_size=1, max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names, rng=range_headers, signed=st.booleans())
def test_any_name_and_range_never_gets_a_5xx(background, bundle, name, rng, signed):
    node = background.node
    status, headers, body = background.call(
        raw_get(node, background.ctx, name, {"Range": rng} if rng is not None else None, KEY if signed else None))
    assert status < 500, (name, rng, status, body[:200])
    if status in (200, 206):
        assert signed
        data = (Path(bundle) / name).read_bytes()
        assert int(headers["Content-Length"]) == len(body)
        if status == 200:
            assert body == data
        else:
            a, b = headers["Content-Range"].split()[1].split("/")[0].split("-")
            assert body == data[int(a):int(b) + 1]
    elif not signed:
        assert status in (401, 404, 405)
