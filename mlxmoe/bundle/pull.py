"""`mlxmoe pull`: only the bytes one node needs from a Hugging Face repo.

The repo's safetensors headers come first (ranged reads: the first 8 bytes
give the header's length, then the JSON header), then only the tensors the
node needs: the trunk (every tensor that is not a routed expert) and the
routed experts it holds, each fetched with HTTP Range requests (tensors
adjacent in a shard share one request). They are written as a local
checkpoint directory that `open_source` reads: config.json and the tokenizer
files, `model.safetensors.index.json` naming only the pulled tensors, and one
shard per source shard holding only its pulled tensors. `split_pulled` turns
it into this node's bundle, quantized on the way (split's own code; `mlxmoe
split` wants every expert). With a layout manifest (`plan`) the bundle is the
node's part of that layout, checked file by file against it, so it serves
in the same cluster as nodes that copied their part.

Resumable: shards are written as `NAME.partial` (renamed when complete, the
index last, so `open_source` never reads a pull cut short), and `.mlxmoe-pull.json`
records each tensor written with the sha256 of its bytes; a tensor written and
checked is not fetched again.

The hub is `HF_ENDPOINT` (huggingface_hub's endpoint by default); listing and
URLs go through huggingface_hub, ranged reads through aiohttp (redirects to
the hub's CDN followed, the token not sent to another host). Files small
enough to be metadata are verified against the hub's git or LFS hash; tensor
ranges cannot be (the hub hashes whole files), so they are checked by length
and, once written, by the sha256 the state file keeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlxmoe.bundle.arch import get_arch, moe_facts, normalize_config
from mlxmoe.bundle.checkpoint import itemsize
from mlxmoe.bundle.manifest import Manifest, contiguous
from mlxmoe.bundle.split import _COPY, _SKIP  # the files split copies into a bundle
from mlxmoe.errors import BundleError, CheckpointError, ManifestError, MlxMoeError

log = logging.getLogger("mlxmoe.pull")

STATE = ".mlxmoe-pull.json"
INDEX = "model.safetensors.index.json"
PARTIAL = ".partial"
MAX_HEADER = 100 << 20
MAX_SPAN = 64 << 20  # bytes per ranged request at most
CHUNK = 1 << 20
PARALLEL = 4  # ranged requests in flight
RETRIES = 3  # per request, on a dropped connection or a 5xx/429
SAVE_EVERY_S = 2.0  # the state file, while tensors arrive
META_MAX = 64 << 20  # files copied whole, as split copies them into a bundle


# ---------------------------------------------------------------- which experts

def group_experts(config: dict, group: int, n_groups: int) -> dict[int, list[int]]:
    """Group `group` of `n_groups` contiguous ones at every MoE layer (split's default grouping)."""
    facts = moe_facts(config)
    if not 1 <= n_groups <= facts.n_experts:
        raise MlxMoeError(f"--groups {n_groups}: must be between 1 and the number of experts ({facts.n_experts})")
    if not 0 <= group < n_groups:
        raise MlxMoeError(f"--group {group}: must be 0..{n_groups - 1}")
    ids = contiguous(facts.n_experts, n_groups)[group]
    return {l: list(ids) for l in facts.moe_layers}


def plan_experts(plan, group: int) -> dict[int, list[int]]:
    """The experts node `group` of a bundle or layout manifest holds: its group and the overlay."""
    m = plan if isinstance(plan, Manifest) else Manifest.load(plan)
    if not 0 <= group < m.n_groups:
        raise MlxMoeError(f"--group {group}: this plan has groups 0..{m.n_groups - 1}")
    return {l: m.eligible(group, l) for l in m.moe_layers}


def _check_experts(experts: dict, facts) -> dict[int, list[int]]:
    out = {}
    for l, ids in experts.items():
        l = int(l)
        if l not in facts.moe_layers:
            raise MlxMoeError(f"experts: layer {l} is not an MoE layer of this model (MoE layers: {facts.moe_layers})")
        bad = [e for e in ids if not isinstance(e, int) or not 0 <= e < facts.n_experts]
        if bad:
            raise MlxMoeError(f"experts: layer {l}: expert(s) {bad[:5]} do not exist (0..{facts.n_experts - 1})")
        out[l] = sorted(set(ids))
    missing = [l for l in facts.moe_layers if l not in out]
    if missing:
        raise MlxMoeError(f"experts: MoE layer(s) {missing[:5]} are not listed (a node needs experts at every MoE layer)")
    return out


# ---------------------------------------------------------------- the plan of one pull

@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list
    src: int  # absolute offsets in the source shard
    end: int
    out: int = 0  # offset in the output shard's data section

    @property
    def nbytes(self) -> int:
        return self.end - self.src


@dataclass
class Shard:
    name: str
    size: int
    tensors: list = field(default_factory=list)  # the pulled ones, in source order
    metadata: dict = field(default_factory=dict)
    base: int = 0  # the output's data section starts here
    blob: bytes = b""  # the output's header (length prefix included)

    def layout(self) -> None:
        off = 0
        header = {}
        for t in self.tensors:
            t.out = off
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        if self.metadata:
            header = {"__metadata__": self.metadata, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.blob = struct.pack("<Q", len(blob)) + blob
        self.base = len(self.blob)

    @property
    def out_size(self) -> int:
        return self.base + sum(t.nbytes for t in self.tensors)


def parse_header(raw: bytes, size: int, where: str) -> tuple[dict, list[Tensor]]:
    """(metadata, tensors in source order) of a safetensors header, checked
    against the file size as checkpoint.SafetensorsFile checks a local one."""
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a map)")
    meta = header.pop("__metadata__", None) or {}
    out = []
    for name, h in header.items():
        try:
            dtype, shape, (s, e) = h["dtype"], list(h["shape"]), h["data_offsets"]
            want = itemsize(dtype)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r}: malformed or unsupported header entry") from None
        for d in shape:
            want *= int(d)
        if e - s != want or s < 0 or 8 + n + e > size:
            raise CheckpointError(f"{where}: tensor {name!r}: bytes {s}..{e} do not fit shape {shape} {dtype} "
                                  f"in a {size}-byte file")
        out.append(Tensor(name, dtype, shape, 8 + n + s, 8 + n + e))
    out.sort(key=lambda t: t.src)
    return meta, out


def runs(tensors: list[Tensor], max_span: int = MAX_SPAN) -> list[list[Tensor]]:
    """Tensors (source order) cut into runs adjacent in the source, each one ranged request."""
    out: list[list[Tensor]] = []
    for t in tensors:
        if out and out[-1][-1].end == t.src and t.end - out[-1][0].src <= max_span:
            out[-1].append(t)
        else:
            out.append([t])
    return out


# ---------------------------------------------------------------- pulling

def pull(repo: str, dest, experts: dict | None = None, revision: str | None = None,
         progress: Callable[[int], None] | None = None, *, on_total: Callable[[int], None] | None = None,
         token: str | bool | None = None, force: bool = False, retries: int = RETRIES) -> dict:
    """Pull `repo` (at `revision`) into `dest`: the trunk and, per MoE layer,
    the experts `experts` lists ({layer: [ids]}, or a function of the repo's
    config.json giving one, e.g. for group_experts; None: every expert). Returns
    {"repo", "revision", "dest", "downloaded" (bytes over the network this run),
    "pulled" (bytes of the pulled tensors), "reused" (of those, already here),
    "repo_bytes" (the whole repo), "tensors", "shards", "experts"}."""
    return asyncio.run(pull_async(repo, dest, experts, revision, progress, on_total=on_total, token=token,
                                  force=force, retries=retries))


async def pull_async(repo: str, dest, experts: dict | None = None, revision: str | None = None,
                     progress: Callable[[int], None] | None = None, *, on_total: Callable[[int], None] | None = None,
                     token: str | bool | None = None, force: bool = False, retries: int = RETRIES) -> dict:
    p = _Pull(repo, Path(dest), revision, progress or (lambda n: None), token, retries)
    return await p.run(experts, on_total or (lambda n: None), force)


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


class _Pull:
    def __init__(self, repo, dest: Path, revision, advance, token, retries):
        self.repo, self.dest, self.revision, self.advance, self.token = repo, dest, revision, advance, token
        self.retries = retries
        self.downloaded = 0
        self.done: dict[str, str] = {}  # tensor -> sha256 of its bytes, written and checked
        self.sizes: dict[str, int] = {}  # file -> size (the listing's, else a Content-Range's)
        self.stale: set[str] = set()  # output shards of an earlier pull into dest
        self.state: dict = {}

    # ---- the hub
    async def run(self, experts, on_total, force) -> dict:
        import aiohttp
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers
        from mlxmoe import __version__

        if getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)():
            raise CheckpointError("pull needs the network, and HF_HUB_OFFLINE is set (unset it to pull)")
        self.endpoint = endpoint()
        info = await asyncio.to_thread(self._model_info)
        self.commit = info.sha or self.revision or "main"
        files = {s.rfilename: s for s in info.siblings or []}
        repo_bytes = sum(s.size or 0 for s in files.values())
        self.auth = build_hf_headers(token=self.token, library_name="mlxmoe", library_version=__version__)
        self.dest.mkdir(parents=True, exist_ok=True)
        self._load_state(force)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as self.http:
            await self._meta_files(files)
            config = json.loads((self.dest / "config.json").read_text())
            cfg = normalize_config(config)
            arch = get_arch(cfg.get("model_type"), f"{self.repo}/config.json")
            facts = moe_facts(cfg)
            if callable(experts):
                experts = experts(config)
            want = None if experts is None else _check_experts(experts, facts)
            shards = await self._headers(files)
            is_mlx = "quantization" in config or any(".switch_mlp." in t.name for s in shards for t in s.tensors)
            self._select(shards, arch, want, is_mlx or arch.packed)
            shards = [s for s in shards if s.tensors]
            pulled = sum(t.nbytes for s in shards for t in s.tensors)
            await asyncio.to_thread(self._prepare, shards)
            reused = sum(t.nbytes for s in shards for t in s.tensors if t.name in self.done)
            on_total(pulled)
            self.advance(reused)
            saver = asyncio.ensure_future(self._save_every())
            try:
                await self._tensors(shards)
            finally:
                saver.cancel()
                self._save()
        self._finish(shards, want)
        return {"repo": self.repo, "revision": self.commit, "dest": str(self.dest), "downloaded": self.downloaded,
                "pulled": pulled, "reused": reused, "repo_bytes": repo_bytes,
                "tensors": sum(len(s.tensors) for s in shards), "shards": [s.name for s in shards],
                "experts": "all" if want is None else {str(l): ids for l, ids in want.items()}}

    def _model_info(self):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            return HfApi(endpoint=self.endpoint, token=self.token).model_info(self.repo, revision=self.revision,
                                                                               files_metadata=True)
        except GatedRepoError:
            raise CheckpointError(f"{self.repo}: gated; accept its terms on the hub and log in (`hf auth login`)") from None
        except RevisionNotFoundError:
            raise CheckpointError(f"{self.repo}: no revision {self.revision!r} on {self.endpoint}") from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{self.repo}: no such model repo on {self.endpoint} (or it is private: "
                                  "`hf auth login`)") from None
        except HfHubHTTPError as e:
            raise CheckpointError(f"{self.repo}: the hub at {self.endpoint} answered {e}") from None
        except Exception as e:  # the network (huggingface_hub's HTTP client raises its own kinds)
            raise CheckpointError(f"{self.repo}: cannot list it on {self.endpoint}: {type(e).__name__}: {e}") from None

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, name, revision=self.commit, endpoint=self.endpoint)

    async def _get(self, name: str, start: int | None = None, end: int | None = None, sink=None) -> int:
        """GET `name` (bytes [start, end) when given) into sink(offset, data);
        retried on a dropped connection or a busy hub, resuming where it stopped.
        Returns the bytes received."""
        import aiohttp

        pos, got, attempt = start or 0, 0, 0
        while True:
            headers = dict(self.auth)
            if start is not None:
                headers["Range"] = f"bytes={pos}-{end - 1}"
            try:
                async with self.http.get(self.url(name), headers=headers) as resp:
                    if resp.status in (429, 500, 502, 503, 504):
                        ra = resp.headers.get("Retry-After", "")
                        raise _Retry(f"HTTP {resp.status}", min(float(ra), 60.0) if ra.isdigit() else 0.0)
                    if resp.status in (401, 403):
                        raise CheckpointError(f"{self.repo}/{name}: refused (HTTP {resp.status}); a gated or private "
                                              "repo needs its terms accepted and `hf auth login`")
                    if start is not None and resp.status != 206:
                        raise CheckpointError(f"{self.endpoint}: answered a ranged read of {self.repo}/{name} with "
                                              f"HTTP {resp.status}, not 206 (no Range support?)")
                    if resp.status not in (200, 206):
                        raise CheckpointError(f"{self.repo}/{name}: HTTP {resp.status} from {self.endpoint}")
                    if start is not None:
                        cr = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers.get("Content-Range", ""))
                        if cr is None or int(cr.group(1)) != pos:
                            raise CheckpointError(f"{self.repo}/{name}: asked for bytes {pos}.., got "
                                                  f"{resp.headers.get('Content-Range')!r}")
                        self.sizes.setdefault(name, int(cr.group(3)))
                    async for data in resp.content.iter_chunked(CHUNK):
                        if end is not None and pos + len(data) > end:
                            raise CheckpointError(f"{self.repo}/{name}: more bytes than asked for")
                        await sink(pos, data)
                        pos += len(data)
                        got += len(data)
                        self.downloaded += len(data)
                if end is not None and pos != end:
                    raise _Retry(f"the body ended at byte {pos} of {end}")
                return got
            except (_Retry, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                attempt += 1
                if attempt > self.retries:
                    raise CheckpointError(f"{self.repo}/{name}: download failed ({type(e).__name__}: {e}); run the "
                                          "same pull again to resume") from None
                if start is None:  # a whole file starts over (the sink sees offset 0 again)
                    pos = 0
                log.info("%s: %s; retrying from byte %d", name, e, pos)
                await asyncio.sleep(max(min(0.5 * 2 ** attempt, 10.0), getattr(e, "wait", 0.0)))

    async def _fetch(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        parts: list[bytes] = []
        total = [0]

        async def sink(pos, data):
            if pos == 0:  # (again, after a retry)
                parts.clear()
                total[0] = 0
            parts.append(data)
            total[0] += len(data)
            if total[0] > MAX_HEADER:
                raise CheckpointError(f"{self.repo}/{name}: larger than expected")
        await self._get(name, start, end, sink)
        return b"".join(parts)

    # ---- small files, whole
    async def _meta_files(self, files: dict) -> None:
        names = [n for n, s in files.items() if "/" not in n and not n.startswith(".") and _COPY.fullmatch(n)
                 and n not in _SKIP and (s.size or 0) < META_MAX]
        if "config.json" not in names:
            raise CheckpointError(f"{self.repo}: no config.json at revision {self.commit}")
        for n in sorted(names):
            s, p = files[n], self.dest / n
            if p.exists() and s.size is not None and p.stat().st_size == s.size and _hub_hash_ok(p.read_bytes(), s):
                continue
            data = await self._fetch(n)
            if not _hub_hash_ok(data, s):
                raise CheckpointError(f"{self.repo}/{n}: the downloaded bytes do not match the hub's hash")
            tmp = self.dest / f".{n}{PARTIAL}"
            tmp.write_bytes(data)
            tmp.replace(p)

    # ---- headers and the selection
    async def _headers(self, files: dict) -> list[Shard]:
        if INDEX in files:
            index = json.loads(await self._fetch(INDEX))
            try:
                names = sorted(set(index["weight_map"].values()))
            except (KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{self.repo}/{INDEX}: malformed index (no weight_map)") from None
        else:
            names = sorted(n for n in files if re.fullmatch(r"model.*\.safetensors", n))
        if not names:
            raise CheckpointError(f"{self.repo}: no model*.safetensors files and no {INDEX}")
        bad = [n for n in names if n not in files or "/" in n or n.startswith(".")]
        if bad:
            raise CheckpointError(f"{self.repo}/{INDEX}: names shard {bad[0]!r}, which the repo does not have")
        return list(await asyncio.gather(*(self._header(n, files[n].size) for n in names)))

    async def _header(self, name: str, size: int | None) -> Shard:
        got = bytearray()

        async def sink(pos, data):
            got.extend(data)
        if size is not None and size < 8:
            raise CheckpointError(f"{self.repo}/{name}: truncated (no safetensors header)")
        await self._get(name, 0, 8, sink)  # the length first: a probe of more would read tensors of small shards
        size = self.sizes.get(name, size) if size is None else size
        (n,) = struct.unpack("<Q", bytes(got[:8]))
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{self.repo}/{name}: corrupt safetensors header (length {n}, file size {size})")
        if 8 + n > len(got):
            await self._get(name, len(got), 8 + n, sink)
        meta, tensors = parse_header(bytes(got[: 8 + n]), size, f"{self.repo}/{name}")
        return Shard(name, size, tensors, meta)

    def _select(self, shards: list[Shard], arch, want: dict | None, stacked: bool) -> None:
        rx = arch.expert_re()
        for s in shards:
            keep = []
            for t in s.tensors:
                m = rx.match(t.name) if not stacked else None
                if want is None or not (m or (stacked and _is_stacked_expert(arch, t.name))):
                    keep.append(t)  # trunk, or every expert
                elif stacked:
                    raise CheckpointError(f"{self.repo}: stores each layer's experts stacked in one tensor "
                                          f"({t.name}); pull it whole (no --group), or pull the original bf16 repo")
                elif int(m.group(2)) in want.get(int(m.group(1)), ()):
                    keep.append(t)
            s.tensors = keep
            s.layout()

    # ---- the output files and the state
    def _load_state(self, force: bool) -> None:
        p = self.dest / STATE
        if p.exists():
            try:
                st = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                st = {}
            self.stale = set(st.get("shards", {})) if isinstance(st.get("shards"), dict) else set()
            if st.get("repo") == self.repo and st.get("revision") == self.commit:
                self.state, self.done = st, dict(st.get("done", {}))
                return
            if st and not force:
                raise CheckpointError(f"{self.dest}: holds a pull of {st.get('repo')}@{str(st.get('revision'))[:12]}, "
                                      f"not {self.repo}@{self.commit[:12]}; use another directory (or --force to "
                                      "start over here)")
        self.state = {"format": "mlxmoe.pull", "version": 1, "repo": self.repo, "revision": self.commit,
                      "endpoint": self.endpoint, "shards": {}, "done": {}}
        self.done = {}

    def _prepare(self, shards: list[Shard]) -> None:
        """Open (or lay out anew) each output shard; keep the tensors already
        written whose bytes still hash to what the state recorded."""
        self.fds = {}
        keep = {}
        (self.dest / INDEX).unlink(missing_ok=True)  # until the pull is complete again, nothing reads it as one
        self.state["complete"] = False
        for name in self.stale - {s.name for s in shards}:  # an earlier pull's shard this one does not need
            if "/" not in name and not name.startswith("."):
                (self.dest / name).unlink(missing_ok=True)
                (self.dest / (name + PARTIAL)).unlink(missing_ok=True)
            self.state["shards"].pop(name, None)
        for s in shards:
            final, part = self.dest / s.name, self.dest / (s.name + PARTIAL)
            head = hashlib.sha256(s.blob).hexdigest()
            path = final if final.exists() else part
            ok = (self.state["shards"].get(s.name) == head and path.exists() and path.stat().st_size == s.out_size
                  and _read(path, 0, len(s.blob)) == s.blob)
            if ok and path == final:
                final.replace(part)  # complete before; written again only if a tensor fails its check
            if not ok:
                final.unlink(missing_ok=True)
                with open(part, "wb") as f:
                    f.write(s.blob)
                    f.truncate(s.out_size)
            self.fds[s.name] = os.open(part, os.O_RDWR)
            self.state["shards"][s.name] = head
            for t in s.tensors:
                sha = self.done.get(t.name) if ok else None
                if sha is not None and _sha(self.fds[s.name], s.base + t.out, t.nbytes) == sha:
                    keep[t.name] = sha
        self.done = keep
        self.state["done"] = self.done
        self._save()

    def _save(self, text: str | None = None) -> None:
        p, tmp = self.dest / STATE, self.dest / (STATE + PARTIAL)
        tmp.write_text(text if text is not None else json.dumps(self.state))
        tmp.replace(p)

    async def _save_every(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            text = json.dumps(self.state)  # here, on the loop: the runs add to `done` between awaits
            await asyncio.to_thread(self._save, text)

    # ---- tensors
    async def _tensors(self, shards: list[Shard]) -> None:
        sem = asyncio.Semaphore(PARALLEL)
        jobs = []
        for s in shards:
            todo = [t for t in s.tensors if t.name not in self.done]
            jobs += [self._run(s, r, sem) for r in runs(todo)]
        try:  # every run goes to its end (or is cancelled with us) before the files close
            errors = [e for e in await asyncio.gather(*jobs, return_exceptions=True) if isinstance(e, BaseException)]
        finally:
            for fd in self.fds.values():
                os.close(fd)
        if errors:
            raise errors[0]

    async def _run(self, s: Shard, run: list[Tensor], sem: asyncio.Semaphore) -> None:
        """One ranged request for tensors adjacent in the source (and so in
        the output); each is marked done once its last byte is written. A
        retry inside _get resumes at the byte where the body stopped, so the
        running hash goes on; a run that fails leaves its unfinished tensors
        not done, for the next pull."""
        async with sem:
            fd, start, i, h = self.fds[s.name], run[0].src, 0, hashlib.sha256()

            async def sink(pos, data):
                nonlocal i, h
                os.pwrite(fd, data, s.base + run[0].out + (pos - start))  # no thread: it could outlive the fd
                view, off = memoryview(data), 0
                while off < len(data):
                    t = run[i]
                    take = min(len(data) - off, t.end - (pos + off))
                    h.update(view[off: off + take])
                    off += take
                    if pos + off == t.end:
                        self.done[t.name] = h.hexdigest()
                        h, i = hashlib.sha256(), i + 1
                self.advance(len(data))
            await self._get(s.name, start, run[-1].end, sink)

    def _finish(self, shards: list[Shard], want) -> None:
        missing = [t.name for s in shards for t in s.tensors if t.name not in self.done]
        if missing:
            raise CheckpointError(f"{self.dest}: {len(missing)} tensors not pulled (first: {missing[0]}); run the "
                                  "same pull again to resume")
        for s in shards:
            (self.dest / (s.name + PARTIAL)).replace(self.dest / s.name)
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.tensors),
                              "mlxmoe_pull": {"repo": self.repo, "revision": self.commit,
                                              "experts": "all" if want is None else
                                              {str(l): ids for l, ids in want.items()}}},
                 "weight_map": {t.name: s.name for s in shards for t in s.tensors}}
        tmp = self.dest / (INDEX + PARTIAL)
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        tmp.replace(self.dest / INDEX)
        self.state["complete"] = True
        self.state["experts"] = index["metadata"]["mlxmoe_pull"]["experts"]
        self._save()


class _Retry(Exception):
    def __init__(self, why: str, wait: float = 0.0):
        super().__init__(why)
        self.wait = wait


def _is_stacked_expert(arch, name: str) -> bool:
    return bool(arch.mlx_expert_re().match(name) or (arch.packed and arch.expert_re().match(name)))


def _hub_hash_ok(data: bytes, sibling) -> bool:
    """The hub's own hash of a whole file: LFS sha256, else the git blob id."""
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None and getattr(lfs, "sha256", None):
        return hashlib.sha256(data).hexdigest() == lfs.sha256
    blob = getattr(sibling, "blob_id", None)
    if blob:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob
    return sibling.size is None or len(data) == sibling.size


def _read(path: Path, start: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(n)


def _sha(fd: int, start: int, n: int) -> str:
    h, pos, end = hashlib.sha256(), start, start + n
    while pos < end:
        b = os.pread(fd, min(CHUNK, end - pos), pos)
        if not b:
            break
        h.update(b)
        pos += len(b)
    return h.hexdigest()


# ---------------------------------------------------------------- the pulled checkpoint -> this node's bundle

def split_pulled(pulled, out, group: int, n_groups: int | None = None, plan=None, bits=4, group_size=64,
                 trunk_bits=8, kv_bits=8, force: bool = False, progress=None) -> Manifest:
    """The bundle of node `group` from a pulled checkpoint, written with
    split's own code: the trunk, the group's file, the overlay, the
    tokenizer and config files. Contiguous groups of `n_groups` (split's
    default), or the grouping, overlay and quantization of `plan` (a bundle or
    layout manifest): then every file must come out byte for byte the plan's
    (BundleError names the one that does not: another source revision,
    quantization or MLX version), and the bundle carries the plan's manifest,
    so this node joins a cluster of that plan. `mlxmoe split` needs every
    expert, so it cannot split a pulled subset."""
    from mlxmoe import __version__
    from mlxmoe.bundle.checkpoint import open_source
    from mlxmoe.bundle.copy import node_files
    from mlxmoe.bundle.manifest import OVERLAY_FILE, TRUNK_FILE, group_file
    from mlxmoe.bundle.split import (Experts, check_groups_fit, make_grouping, make_overlay, quantization,
                                     write_experts, write_trunk)
    from mlxmoe.bundle.writer import write_bundle

    pulled = Path(pulled)
    src = open_source(str(pulled))
    config = normalize_config(src.config)
    arch = get_arch(config.get("model_type"), str(pulled / "config.json"))
    facts = moe_facts(config)
    pm = None
    if plan is not None:
        pm = plan if isinstance(plan, Manifest) else Manifest.load(plan)
        if pm.moe_layers != facts.moe_layers or pm.n_experts != facts.n_experts:
            raise ManifestError(f"--plan: manifest {pm.hash} is of another model ({pm.n_experts} experts at layers "
                                f"{pm.moe_layers[:4]}..., this checkpoint {facts.n_experts} at {facts.moe_layers[:4]}...)")
        grouping, overlay, n_groups = pm.grouping, pm.overlay, pm.n_groups
        q = pm.quantization
        bits = (q.get("experts") or {}).get("bits")
        trunk_bits = (q.get("trunk") or {}).get("bits")
        group_size = (q.get("experts") or q.get("trunk") or {}).get("group_size", group_size)
        kv_bits = q.get("kv_bits")
        healed = [n for n in node_files(pm, [group]) if pm.files[n]["role"] == "heal"]
        if healed:
            raise BundleError(f"--plan: {healed[0]} (made by `mlxmoe calibrate --heal`) cannot come from the hub; "
                              "fetch this node's part from a node of the cluster instead")
    else:
        if n_groups is None:
            raise MlxMoeError("split_pulled: give n_groups (contiguous groups) or a plan")
        grouping, overlay = make_grouping(facts, n_groups, None), make_overlay(facts, None)
        check_groups_fit(facts, grouping, overlay)
    if not 0 <= group < n_groups:
        raise MlxMoeError(f"--group {group}: must be 0..{n_groups - 1}")
    experts = Experts(src, arch, None if src.is_mlx else bits, group_size)
    if not src.is_mlx and not arch.packed:
        have = {(l, e) for (l, e, p, k) in experts.names if k == "weight"}
        for l in facts.moe_layers:
            need = set(grouping["layers"][str(l)][group]) | set(overlay["layers"].get(str(l), []))
            lack = sorted(e for e in need if (l, e) not in have)
            if lack:
                raise CheckpointError(f"{pulled}: has no tensors of layer {l} expert(s) {lack[:5]}, which group {group} "
                                      "needs; pull them with the same --group/--groups (or --plan)")
    quant = quantization(src, bits, trunk_bits, group_size, kv_bits)
    out = Path(out)
    if out.exists() and not force:
        raise MlxMoeError(f"{out}: already exists (use --force to replace it)")
    progress = progress or (lambda n: None)
    want_meta = None if pm is None else {n for n, f in pm.files.items() if f["role"] == "meta"}

    def fill(tmp: Path) -> dict:
        write_trunk(tmp / TRUNK_FILE, src, arch, experts.tensor_names(), None if src.is_mlx else trunk_bits,
                    group_size, progress)
        files = {TRUNK_FILE: {"role": "trunk"}}
        write_experts(tmp / group_file(group), experts, arch,
                      {l: grouping["layers"][str(l)][group] for l in facts.moe_layers}, progress)
        files[group_file(group)] = {"role": "group", "group": group}
        if any(overlay["layers"].values()):
            write_experts(tmp / OVERLAY_FILE, experts, arch, {int(l): ids for l, ids in overlay["layers"].items()},
                          progress)
            files[OVERLAY_FILE] = {"role": "overlay"}
        for f in sorted(pulled.iterdir()):
            if (f.is_file() and not f.name.startswith(".") and _COPY.match(f.name) and f.name not in _SKIP
                    and f.stat().st_size < 64 << 20 and (want_meta is None or f.name in want_meta)):
                shutil.copy2(f, tmp / f.name)
                files[f.name] = {"role": "meta"}
        return files

    def manifest(files: dict) -> Manifest:
        if pm is not None:
            return _as_planned(pm, group, files)
        state = _state(pulled)
        model = {"id": state.get("repo") or src.model_id, "revision": state.get("revision") or src.revision,
                 "model_type": config["model_type"], "config": config, "mlxmoe_version": __version__}
        return Manifest(model=model, moe=facts.to_dict(), n_groups=n_groups, grouping=grouping, overlay=overlay,
                        quantization=quant, files=files, calibration=None,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    return write_bundle(out, fill, manifest)


def _as_planned(pm: Manifest, group: int, files: dict) -> Manifest:
    """The plan's manifest, once every file node `group` needs came out as the plan has it."""
    from mlxmoe.bundle.copy import node_files

    for name in node_files(pm, [group]):
        if name not in files:
            raise BundleError(f"--plan: {name} (in manifest {pm.hash}) is not in the pulled checkpoint; "
                              "was the plan split from another source?")
        if files[name]["sha256"] != pm.files[name]["sha256"]:
            raise BundleError(f"--plan: {name} came out different from manifest {pm.hash}'s (sha256); the plan was "
                              "split from another revision, or with another quantization or MLX version")
    return pm


def _state(pulled: Path) -> dict:
    try:
        return json.loads((pulled / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
