"""Bundle parts over the LAN: a joining node fetches the files it needs
(`bundle.copy.node_files`: the tokenizer and config files, the trunk, its
group, the overlay, its healed file) from a node that has them, over the
cluster's mutual TLS, sha256-verified against the manifest, resumable.

Server: ``GET /parts/{manifest_hash}/{name}`` serves one file of the node's
bundle, with HTTP Range (206), streamed in chunks. Only names the manifest
lists (and the manifest itself, `distribution.json`) are served: a name is
looked up in the manifest's file list, never joined to a path as given. The
TLS layer already wants a certificate the cluster CA signed; the request must
also carry the RPC's signed preamble (wire.py) for an empty body, checked by
`wire.open_preamble` from the headers before any work, so a client without
the cluster key gets 401 and not a byte. At most `MAX_TRANSFERS` files stream
at once per node; past that a 429 with Retry-After, so serving parts never
starves chats.

wire.py has no op for a GET: the preamble is the one an RPC would carry with
op ``info`` (the op every key holder may call) and an empty body. No RPC has
an empty body (msgpack needs a byte), so a parts preamble never opens as an
RPC, nor an RPC's as a parts request (len must be 0 here), and the two share
the node's replay guard. The preamble names the manifest hash (`mh`), not the
file: the nonce makes a request single-use, and TLS keeps it from being seen.

Client: `fetch_part` downloads each missing or partial file to
``dest/.{name}.part``, resuming with a Range request from the partial size
(the partial bytes are hashed first), renames it into place once its sha256
is the manifest's, and writes the manifest last, so a directory with a
distribution.json is complete. `fetch_manifest` gets the manifest itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web

from mlxmoe import wire
from mlxmoe.bundle.manifest import FILENAME, Manifest
from mlxmoe.cluster import accesslog
from mlxmoe.errors import BundleError, ManifestError, MlxMoeError

log = logging.getLogger("mlxmoe.parts")

PREAMBLE_OP = "info"  # the signed preamble's op (module docstring: why not an op of its own)
MAX_TRANSFERS = 2  # files streaming at once per node; past it 429 + Retry-After
RETRY_AFTER_S = 5
CHUNK = 1 << 20  # bytes per read/write: a group file is never held in memory
WRITE_TIMEOUT_S = 60.0  # a client that stops reading gives its transfer slot back
MAX_MANIFEST_BYTES = 64 << 20
ROUTE = "/parts/{manifest_hash}/{name}"
PARTS = web.AppKey("mlxmoe_parts", object)  # app[PARTS]: the PartsServer (tests reach its counters and hooks)
DEFAULT_SRC = f"parts@{socket.gethostname()}"
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


class PartsError(MlxMoeError):
    """A peer could not give us a file (refused, unreachable, cut off); names the peer and file."""

    status, code = 502, "peer_failed"


# ---------------------------------------------------------------- server

class PartsServer:
    """Serves one node's bundle files. `bundle_dir` and `manifest` may be
    values or zero-argument callables read per request (a node loads its
    engine after its app is built); a bundle_dir of None serves nothing (404).
    `who()` gives the (name, epoch) a request must be signed for."""

    def __init__(self, bundle_dir, manifest, key: bytes, who: Callable[[], tuple[str, str]] = lambda: ("", ""),
                 guard: wire.ReplayGuard | None = None, max_transfers: int = MAX_TRANSFERS):
        self._dir, self._manifest = bundle_dir, manifest
        self.key, self.who = key, who
        self.guard = guard or wire.ReplayGuard()
        self.max_transfers = max_transfers
        self.active = 0
        self.bytes_sent = 0
        self.cut_after: int | None = None  # tests: drop the connection once this many more bytes went out (one-shot)

    def bundle(self) -> tuple[Path | None, Manifest | None]:
        d = self._dir() if callable(self._dir) else self._dir
        if d is None:
            return None, None
        return Path(d), self._manifest() if callable(self._manifest) else self._manifest

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0, status, sent = time.perf_counter(), 499, [0]
        try:
            resp = await self._handle(request, sent)
            status = resp.status
            return resp
        except ConnectionResetError:  # the client went away (or stopped reading): 499, quietly
            return web.Response(status=499)
        finally:
            accesslog.emit({"method": "GET", "op": "part", "status": status, "file": request.match_info.get("name"),
                            "bytes": sent[0], "ms": round((time.perf_counter() - t0) * 1000, 1)})

    async def _handle(self, request: web.Request, sent: list) -> web.StreamResponse:
        node, epoch = self.who()
        length = request.content_length if request.content_length is not None or request.body_exists else 0
        try:
            pre = wire.open_preamble(self.key, request.headers, PREAMBLE_OP, node, epoch, self.guard, length)
            if pre.length != 0:
                raise wire.WireError(400, "length", "a parts request has an empty body (signed length 0)", "len")
        except wire.WireError as e:
            return _refuse(request, e)
        d, m = self.bundle()
        if d is None or m is None:
            return _refuse(request, wire.WireError(404, "not_found", "this node serves no bundle parts"))
        mh, name = request.match_info["manifest_hash"], request.match_info["name"]
        if mh != m.hash or (pre.mh is not None and pre.mh != mh):
            return _refuse(request, wire.WireError(409, "manifest_mismatch", f"this node serves manifest {m.hash}, "
                                                   f"not {mh[:40]!r}", "mh"))
        size = self._size(d, m, name)
        if size is None:
            return _refuse(request, wire.WireError(404, "not_found", f"{name[:80]!r} is not a file of manifest "
                                                   f"{m.hash} that this node holds"))
        try:
            start, end = parse_range(request.headers.get("Range"), size)
        except wire.WireError as e:
            resp = _refuse(request, e)
            resp.headers["Content-Range"] = f"bytes */{size}"
            return resp
        if self.active >= self.max_transfers:
            e = wire.WireError(429, "busy", f"this node is already sending {self.active} files (max "
                                            f"{self.max_transfers}); retry later")
            e.retry_after = RETRY_AFTER_S
            return _refuse(request, e)
        self.active += 1
        try:
            return await self._send(request, d / name, start, end, size, sent)
        finally:
            self.active -= 1

    @staticmethod
    def _size(d: Path, m: Manifest, name: str) -> int | None:
        """The file's size if `name` is one the manifest lists (or the manifest)
        and it is complete here; None otherwise. Names are dict keys, never paths."""
        if name == FILENAME:
            want = None
        elif name in m.files:
            want = m.files[name].get("size")
        else:
            return None
        if name != os.path.basename(name) or name.startswith(".") or "\\" in name:  # a manifest is data, too
            return None
        try:
            st = os.stat(d / name)
        except OSError:
            return None
        if want is not None and st.st_size != want:  # not (yet) complete on this node
            return None
        return st.st_size

    async def _send(self, request, path: Path, start: int, end: int, size: int, sent: list) -> web.StreamResponse:
        n = end - start
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "Content-Length": str(n)}
        partial = request.headers.get("Range") is not None
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except OSError:  # gone since it was looked at
            return _refuse(request, wire.WireError(404, "not_found", f"{path.name} is not on this node any more"))
        try:
            resp = web.StreamResponse(status=206 if partial else 200, headers=headers)
            await resp.prepare(request)
            await asyncio.to_thread(f.seek, start)
            left = n
            while left:
                data = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not data:  # the file shrank under us: the client sees a short body, never a wrong one
                    request.transport and request.transport.abort()
                    raise ConnectionResetError(f"{path.name} shrank while being sent")
                if self.cut_after is not None:
                    data = await self._maybe_cut(request, resp, data, sent)
                await asyncio.wait_for(resp.write(data), WRITE_TIMEOUT_S)
                left -= len(data)
                sent[0] += len(data)
                self.bytes_sent += len(data)
            await resp.write_eof()
            return resp
        except asyncio.TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("client stopped reading") from None
        finally:
            f.close()

    async def _maybe_cut(self, request, resp, data: bytes, sent: list) -> bytes:
        """Tests: send `cut_after` more bytes, then drop the connection (an interrupted transfer)."""
        if len(data) < self.cut_after:
            self.cut_after -= len(data)
            return data
        head, self.cut_after = data[: self.cut_after], None
        await resp.write(head)
        sent[0] += len(head)
        self.bytes_sent += len(head)
        await asyncio.sleep(0.05)  # let the bytes leave before the connection goes
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("cut by the test hook")


def parse_range(header: str | None, size: int) -> tuple[int, int]:
    """[start, end) of one `bytes=` range of a `size`-byte file (the whole
    file without a header). WireError 416 for anything else: several ranges,
    other units, malformed or unsatisfiable."""
    if header is None:
        return 0, size
    m = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        raise wire.WireError(416, "range", "Range must be one range, bytes=START-[END] or bytes=-LAST", "Range")
    a, b = m.group(1), m.group(2)
    if a:
        start = int(a)
        end = min(int(b) + 1, size) if b else size
        if b and int(b) < start:
            raise wire.WireError(416, "range", f"Range {header[:60]!r}: the end is before the start", "Range")
    else:
        start, end = max(0, size - int(b)), size
        if int(b) == 0:
            raise wire.WireError(416, "range", "Range bytes=-0 asks for nothing", "Range")
    if start >= size:
        raise wire.WireError(416, "range", f"Range {header[:60]!r}: the file has {size} bytes", "Range")
    return start, end


def _refuse(request: web.Request, e: wire.WireError) -> web.Response:
    headers = {"Content-Type": wire.CONTENT_TYPE}
    if e.status in (429, 503):
        headers["Retry-After"] = str(e.retry_after or RETRY_AFTER_S)
    resp = web.Response(body=wire.error_response(e), status=e.status, headers=headers)
    if not request.content.is_eof():  # a refused body is never read
        resp.force_close()
    return resp


def add_routes(app: web.Application, bundle_dir, manifest, key: bytes, *,
               who: Callable[[], tuple[str, str]] = lambda: ("", ""), guard: wire.ReplayGuard | None = None,
               max_transfers: int = MAX_TRANSFERS) -> PartsServer:
    """Serve `bundle_dir`'s files of `manifest` on `app` (values, or callables
    read per request). Returns the server, also at app[PARTS]."""
    server = PartsServer(bundle_dir, manifest, key, who, guard, max_transfers)
    app[PARTS] = server
    app.router.add_get(ROUTE, server.handle, allow_head=False)
    return server


def add_node_routes(app: web.Application, node) -> PartsServer:
    """NodeServer.app(): serve the bundle its engine was loaded from
    (`engine.bundle_dir`; an engine without one, like tests' FakeEngine, serves
    no parts), signed for the node's name and epoch, under its replay guard."""
    return add_routes(app, lambda: getattr(node.engine, "bundle_dir", None), lambda: node.engine.manifest, node.key,
                      who=lambda: (node.name, node.epoch), guard=node.guard)


# ---------------------------------------------------------------- client

def signed_headers(key: bytes, manifest_hash: str, dst: str, epoch: str, src: str = DEFAULT_SRC) -> dict:
    """The signed preamble of an empty-bodied request to node `dst` in `epoch`
    (wire.encode_request's, for a body of length 0)."""
    pre = {"v": wire.PROTOCOL_VERSION, "op": PREAMBLE_OP, "ts": time.time(), "nonce": wire.new_nonce(), "dst": dst,
           "ep": epoch, "len": 0, "sha": hashlib.sha256(b"").digest(), "src": src, "mh": manifest_hash}
    raw = wire.pack(pre)
    return {wire.PREAMBLE_HEADER: base64.urlsafe_b64encode(raw).decode(), wire.AUTH_HEADER: wire.sign(key, b"req:" + raw)}


class _Busy(Exception):
    def __init__(self, retry_after: float):
        self.retry_after = retry_after


class _Cut(Exception):
    """The transfer stopped midway (connection lost, short body): resume."""


class _Peer:
    """One peer's parts endpoint: /hello, then signed GETs (asking /hello
    again once when the node restarted)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: bytes, mh: str, src: str):
        self.http, self.url, self.key, self.mh, self.src = http, url.rstrip("/"), key, mh, src
        self.dst: tuple[str, str] | None = None
        self.received = 0  # body bytes received (files and manifest)

    async def hello(self) -> tuple[str, str]:
        try:
            async with self.http.get(f"{self.url}/hello") as resp:
                raw = await resp.content.read(4096)
            self.dst = wire.open_hello(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise PartsError(f"cannot reach {self.url}: {type(e).__name__}: {e}") from None
        except wire.WireError as e:
            raise PartsError(f"{self.url}: {e.message}") from None
        return self.dst

    async def get(self, name: str, start: int = 0):
        """An open response (caller closes it) with status 200 or 206."""
        for attempt in (0, 1):
            dst, epoch = self.dst or await self.hello()
            headers = signed_headers(self.key, self.mh, dst, epoch, self.src)
            if start:
                headers["Range"] = f"bytes={start}-"
            try:
                resp = await self.http.get(f"{self.url}/parts/{self.mh}/{name}", headers=headers)
            except aiohttp.ClientSSLError as e:
                raise PartsError(f"TLS handshake with {self.url} failed (are both certificates from this cluster's "
                                 f"CA?): {e}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self.dst = None
                raise _Cut(f"{type(e).__name__}: {e}") from None
            if resp.status in (200, 206):
                return resp
            raw = await resp.content.read(1 << 16)
            retry_after = resp.headers.get("Retry-After", "")
            resp.release()
            err = wire.refusal(raw)
            if resp.status == 401 and not attempt and err.get("code") in wire.REHELLO_CODES:
                self.dst = None
                continue
            if resp.status in (429, 503):
                raise _Busy(float(retry_after) if retry_after.isdigit() else RETRY_AFTER_S)
            msg = err.get("message") or f"HTTP {resp.status}"
            if resp.status == 401:
                msg = "refused our cluster key (401): every Mac needs the same cluster.key"
            raise PartsError(f"{self.url} would not send {name}: {msg} (HTTP {resp.status})")
        raise PartsError(f"{self.url} would not send {name}: it keeps restarting")


def _session(ssl_context, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout))


async def fetch_manifest(url: str, manifest_hash: str, key: bytes, ssl_context=None, *, src: str = DEFAULT_SRC,
                         timeout: float = 60.0) -> Manifest:
    """The manifest `manifest_hash` from the node at `url`, checked against that hash."""
    async with _session(ssl_context, timeout) as http:
        peer = _Peer(http, url, key, manifest_hash, src)
        try:
            resp = await peer.get(FILENAME)
            async with resp:
                raw = await resp.content.read(MAX_MANIFEST_BYTES + 1)
        except _Cut as e:
            raise PartsError(f"{url}: lost the connection while fetching {FILENAME}: {e}") from None
        except _Busy:
            raise PartsError(f"{url} is busy sending parts; retry later") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PartsError(f"{url}: {FILENAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        m = Manifest.from_dict(json.loads(raw), f"{url}/parts/{manifest_hash}/{FILENAME}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{url}: {FILENAME} is not valid JSON: {e}") from None
    if m.hash != manifest_hash:
        raise ManifestError(f"{url}: sent manifest {m.hash}, not the {manifest_hash} we asked for")
    return m


async def fetch_part(url: str, manifest: Manifest, names: list[str], dest_dir, key: bytes, ssl_context=None,
                     progress: Callable[[int], None] | None = None, *, retries: int = 3, busy_wait_s: float = 600.0,
                     src: str = DEFAULT_SRC, timeout: float = 60.0) -> dict:
    """Download `names` (files `manifest` lists, e.g. bundle.copy.node_files(manifest, [group]))
    from the node at `url` into `dest_dir`; write the manifest last.

    A file already in place is kept when its sha256 is the manifest's; a
    partial one (`.NAME.part`) is hashed and resumed with a Range request. A
    finished file whose sha256 is not the manifest's is deleted; when it had
    been resumed from a partial (whose bytes may be what went bad) it is
    downloaded once more from the start, otherwise BundleError names it.
    A dropped connection is resumed up to `retries` times, a busy peer (429)
    waited for up to `busy_wait_s`. `progress(n)` gets each n bytes done
    (those already on disk included). Returns {"files", "downloaded" (body
    bytes received), "reused" (bytes already here), "bytes" (all files)}."""
    m, dest = manifest, Path(dest_dir)
    unknown = [n for n in names if n not in m.files]
    if unknown:
        raise ManifestError(f"{unknown[0]!r} is not a file of manifest {m.hash}")
    for n in names:  # our own names go into paths: only plain file names
        if n != os.path.basename(n) or n.startswith(".") or "\\" in n:
            raise ManifestError(f"{n!r}: manifest {m.hash} names a file outside its bundle directory")
    dest.mkdir(parents=True, exist_ok=True)
    _drop_stale_manifest(dest, m)
    advance = progress or (lambda n: None)
    stats = {"files": list(names), "downloaded": 0, "reused": 0, "bytes": sum(m.files[n]["size"] for n in names)}
    async with _session(ssl_context, timeout) as http:
        peer = _Peer(http, url, key, m.hash, src)
        for name in names:
            await _fetch_one(peer, m, name, dest, advance, stats, retries, busy_wait_s)
        stats["downloaded"] = peer.received
    tmp = dest / f".{FILENAME}.part"
    tmp.write_text(json.dumps(m.to_dict(), indent=1, sort_keys=False) + "\n")  # Manifest.save's format
    tmp.replace(dest / FILENAME)
    return stats


def _drop_stale_manifest(dest: Path, m: Manifest) -> None:
    """A manifest here says the directory is complete: remove one that is not
    ours before any file changes (ours is written again at the end)."""
    p = dest / FILENAME
    if not p.exists():
        return
    try:
        same = Manifest.load(p).hash == m.hash
    except MlxMoeError:
        same = False
    if not same:
        p.unlink()


def _sha256(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h


async def _fetch_one(peer: _Peer, m: Manifest, name: str, dest: Path, advance, stats: dict, retries: int,
                     busy_wait_s: float) -> None:
    meta = m.files[name]
    size, want = int(meta["size"]), meta["sha256"]
    final, part = dest / name, dest / f".{name}.part"
    counted = 0  # bytes of this file reported to `advance`

    def report(pos: int):
        nonlocal counted
        if pos > counted:
            advance(pos - counted)
            counted = pos

    if final.exists():
        if final.stat().st_size == size and (await asyncio.to_thread(_sha256, final)).hexdigest() == want:
            stats["reused"] += size
            report(size)
            return
        log.warning("%s: not the manifest's file (size or sha256); fetching it again", final)
        final.unlink()
    cuts, waited, fresh_retry, from_disk = 0, 0.0, False, 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        h = await asyncio.to_thread(_sha256, part) if have else hashlib.sha256()  # resume: re-hash what is here
        resumed = have
        if have and not counted:
            from_disk = have
            stats["reused"] += have
        report(have)
        try:
            if have < size:
                have, h = await _download(peer, name, part, have, size, h, report)
        except _Busy as b:
            if waited >= busy_wait_s:
                raise PartsError(f"{peer.url} stayed busy for {waited:.0f}s; {name}: run again to resume") from None
            await asyncio.sleep(b.retry_after)
            waited += b.retry_after
            continue
        except _Cut as e:
            cuts += 1
            if cuts > retries:
                got = part.stat().st_size if part.exists() else 0
                raise PartsError(f"{peer.url}: transfer of {name} interrupted ({e}); {got} of {size} bytes are in "
                                 f"{part}: run again to resume") from None
            log.info("%s: transfer interrupted (%s); resuming", name, e)
            await asyncio.sleep(min(0.25 * 2 ** cuts, 5.0))
            continue
        if h.hexdigest() == want:
            part.replace(final)
            return
        part.unlink()
        stats["reused"] -= from_disk  # not kept after all
        from_disk = 0
        if resumed and not fresh_retry:  # the partial from before may be what went bad: once more, from the start
            log.warning("%s: sha256 does not match the manifest after resuming; downloading it again", name)
            fresh_retry = True
            continue
        raise BundleError(f"{name} from {peer.url}: sha256 does not match manifest {m.hash} (deleted; the peer's "
                          "copy is corrupt or from another split)")


async def _download(peer: _Peer, name: str, part: Path, have: int, size: int, h, report):
    """Append bytes [have, size) of `name` to `part`, hashing them; (bytes now in part, hash)."""
    resp = await peer.get(name, have)
    try:
        if resp.status == 206:
            cr = resp.headers.get("Content-Range", "")
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", cr)
            if m is None or int(m.group(1)) != have or int(m.group(3)) != size:
                raise PartsError(f"{peer.url}: answered {name} bytes={have}- with Content-Range {cr[:80]!r}")
        elif have:  # 200: the whole file, the range ignored; start over
            have, h = 0, hashlib.sha256()
        f = await asyncio.to_thread(open, part, "r+b" if have else "wb")
        try:
            await asyncio.to_thread(f.seek, have)
            await asyncio.to_thread(f.truncate)
            try:
                async for data in resp.content.iter_chunked(CHUNK):
                    if have + len(data) > size:
                        raise PartsError(f"{peer.url}: sent more than the {size} bytes of {name}")
                    await asyncio.to_thread(_write, f, h, data)
                    have += len(data)
                    peer.received += len(data)
                    report(have)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                raise _Cut(f"{type(e).__name__}: {e}") from None
        finally:
            await asyncio.to_thread(f.close)
        if have != size:
            raise _Cut(f"the body ended after {have} of {size} bytes")
        return have, h
    finally:
        resp.release()


def _write(f, h, data: bytes) -> None:
    f.write(data)
    h.update(data)
