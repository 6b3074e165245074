"""`mlxmoe up`: one command per Mac (docs/ARCHITECTURE.md, "mlxmoe up").

The first Mac (`mlxmoe up SOURCE`) coordinates. It holds the cluster's CA and
key (made under the config home when missing), the master bundle (SOURCE with
every expert, split once) and the plan: the member Macs, each one's memory and
the experts it holds (a `layout`-like grouping, `strategy: "up"`). Its process
runs the router and the join server; its node runs as a child process.

A Mac that joins (`mlxmoe up --join TOKEN`) gets its certificate and the key
(cluster/join.py), then enrolls: it names itself, its memory and its node's
port, signed with the cluster key. The coordinator gives it a set sized to
that memory which adds what the others lack first (quality/layout.grow),
writes the new layout bundle from the master, has every member adopt the new
manifest (their parts are byte for byte what they hold: they keep serving),
adopts it in the router, and answers with the joiner's group and manifest. The
joiner fetches its files from the coordinator's node (cluster/parts.py,
resumable, sha256-checked) and serves them. A later `mlxmoe up` on a member
enrolls again and serves what it has.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from mlxmoe.bundle.manifest import FILENAME, TRUNK_FILE, Manifest
from mlxmoe.children import Children
from mlxmoe.errors import MlxMoeError
from mlxmoe.quality import layout as lo

log = logging.getLogger("mlxmoe.up")
STATE = "up.json"  # in the config home: the coordinator's plan, or a member's coordinator
ENROLL_HEADER = "X-MLXMoE-Enroll"  # "<unix time>.<hex HMAC-SHA256(cluster key, time + '\n' + body)>"
ENROLL_MAX = 64 << 10
ENROLL_WINDOW_S = 60.0
KV_CONTEXT = 512  # a Mac's budget keeps a short chat's KV aside (the node sizes its KV budget from free memory)


@dataclass
class Member:
    name: str
    memory: int  # bytes its node may use
    node_url: str
    experts: int = 0  # (layer, expert) pairs it holds


# ------------------------------------------------------------------ the plan (pure)

def up_grouping(sets: list[dict], members: list[Member], layers: list[int], n_experts: int,
                expert_bytes: float, trunk_bytes: int) -> tuple[dict, dict]:
    """The manifest's grouping (every set in its own group file: a member's file never changes
    when another joins) and an empty overlay."""
    nodes = [{"name": mb.name, "memory": mb.memory, "experts": sum(len(s[l]) for l in layers),
              "bytes": int(trunk_bytes + expert_bytes * sum(len(s[l]) for l in layers)),
              "full_model": all(len(s[l]) == n_experts for l in layers)} for mb, s in zip(members, sets)]
    grouping = {"strategy": "up", "overlap": True, "layers": {str(l): [s[l] for s in sets] for l in layers},
                "nodes": nodes}
    missing = lo.left_out(sets, layers, n_experts)
    if missing:
        grouping["left_out"] = {str(l): v for l, v in missing.items()}
    return grouping, {"source": None, "layers": {}}


def sets_of(m: Manifest) -> list[dict]:
    return [{l: m.eligible(g, l) for l in m.moe_layers} for g in range(m.n_groups)]


def slots_for(master: Manifest, memory: int) -> int:
    """(MoE layer, expert) pairs a Mac of `memory` usable bytes holds beside the trunk and its KV."""
    from mlxmoe.bundle.plan import counts_from_config, node_bytes

    cfg = master.model["config"]
    context = min(KV_CONTEXT, int(cfg.get("max_position_embeddings") or KV_CONTEXT))
    kv = node_bytes(counts_from_config(cfg), 1, context=context, kv_bits=master.quantization.get("kv_bits"))["kv"]
    (slots,) = lo.node_slots([("bytes", float(memory))], master.n_experts, len(master.moe_layers),
                             master.expert_bytes(), master.files[TRUNK_FILE]["size"], kv, 1.0, master.top_k)
    return slots


def replan(master: Manifest, members: list[Member]) -> list[dict]:
    """A fresh plan for the members as they are now (`mlxmoe up --replan`), not in the order they joined: the
    sets grown largest memory first, so the largest Mac holds the most and the others add what it lacks;
    member i keeps group i."""
    sets: dict[int, dict] = {}
    for i in sorted(range(len(members)), key=lambda i: -members[i].memory):
        sets[i] = lo.grow(list(sets.values()), slots_for(master, members[i].memory), master.moe_layers,
                          master.n_experts, master.top_k)
    return [sets[i] for i in range(len(members))]


# ------------------------------------------------------------------ enrollment (signed with the cluster key)

def enroll_signature(key: bytes, body: bytes, now: float | None = None) -> str:
    ts = str(int(now if now is not None else time.time()))
    return ts + "." + hmac.new(key, ts.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def check_enroll_signature(key: bytes, header: str | None, body: bytes, now: float | None = None) -> None:
    now = time.time() if now is None else now
    ts, _, mac = (header or "").partition(".")
    if not ts.isdigit() or abs(now - int(ts)) > ENROLL_WINDOW_S:
        raise web.HTTPUnauthorized(text="enroll: missing or stale signature (another cluster key, or a clock off)")
    want = hmac.new(key, ts.encode() + b"\n" + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise web.HTTPUnauthorized(text="enroll: bad signature: this Mac's cluster key is not the cluster's")


def parse_enroll(body: bytes) -> dict:
    """{"name", "memory", "port", "host"?}: a 400 naming the field otherwise."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise web.HTTPBadRequest(text="enroll: the body is not JSON") from None
    if not isinstance(doc, dict):
        raise web.HTTPBadRequest(text="enroll: expected an object")
    name, memory, port, host = doc.get("name"), doc.get("memory"), doc.get("port"), doc.get("host")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise web.HTTPBadRequest(text="name: a host name (letters, digits, . _ -; at most 63)")
    if not isinstance(memory, int) or isinstance(memory, bool) or not 0 < memory < 1 << 50:
        raise web.HTTPBadRequest(text="memory: a positive number of bytes")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise web.HTTPBadRequest(text="port: the node's port, 1..65535")
    if host is not None and (not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host)):
        raise web.HTTPBadRequest(text="host: an address or host name")
    return doc


# ------------------------------------------------------------------ the coordinator

class Coordinator:
    """The first Mac's plan, and what changes it (a Mac enrolls). `router` is the running Router."""

    def __init__(self, home: Path, master: Path, layout: Path, key: bytes, router, ssl_context):
        self.home, self.master_dir, self.layout_dir, self.key = home, master, layout, key
        self.router, self.ssl_context = router, ssl_context
        self.master = Manifest.load(master)
        self.members: list[Member] = []
        self.lock = asyncio.Lock()

    @property
    def layout(self) -> Manifest:
        return Manifest.load(self.layout_dir)

    def save(self) -> None:
        state = {"role": "coordinator", "master": str(self.master_dir), "layout": str(self.layout_dir),
                 "members": [asdict(m) for m in self.members]}
        (self.home / STATE).write_text(json.dumps(state, indent=1))

    def plan(self, sets: list[dict]) -> tuple[dict, dict]:
        m = self.master
        return up_grouping(sets, self.members, m.moe_layers, m.n_experts, m.expert_bytes(), m.files[TRUNK_FILE]["size"])

    def write(self, sets: list[dict]) -> Manifest:
        """The layout bundle of `sets` from the master's files (MLX: on the router's worker thread)."""
        from mlxmoe.quality.calibrate import rebundle

        grouping, overlay = self.plan(sets)
        calib = {"up": {"members": [asdict(m) for m in self.members], "date": time.strftime("%Y-%m-%d")}}
        return rebundle(self.master_dir, self.layout_dir, grouping, overlay, calib)

    def first(self, me: Member) -> Manifest:
        """The plan of the coordinator alone (before any thread drives MLX)."""
        sets = [lo.grow([], slots_for(self.master, me.memory), self.master.moe_layers, self.master.n_experts,
                        self.master.top_k)]
        self.members = [me]
        return self.apply(sets)

    def replan(self) -> tuple[list[dict], list[str]]:
        """Every member's set planned afresh (not written yet), and what changes, one line per member."""
        old, new = sets_of(self.layout), replan(self.master, self.members)
        count = lambda st: sum(len(v) for v in st.values())  # noqa: E731
        return new, [f"{mb.name}: {count(a)} -> {count(b)} experts"
                     + (" (a new part: it fetches it when `mlxmoe up` runs there again)" if i and a != b else "")
                     for i, (mb, a, b) in enumerate(zip(self.members, old, new))]

    def apply(self, sets: list[dict]) -> Manifest:
        """Serve `sets` from now on (before any thread drives MLX)."""
        for mb, st in zip(self.members, sets):
            mb.experts = sum(len(v) for v in st.values())
        m = self.write(sets)
        self.save()
        return m

    async def add(self, name: str, memory: int, node_url: str) -> tuple[int, Manifest]:
        """A Mac joins: its group and the new manifest. Members keep their parts (they adopt)."""
        async with self.lock:
            old = self.layout
            known = next((i for i, mb in enumerate(self.members) if mb.name == name), None)
            if known is not None:  # enrolling again (a restart): same part, maybe a new address and memory
                self.members[known].node_url, self.members[known].memory = node_url, memory  # (--replan reads it)
                self.save()
                await self.router.add_peer(node_url)
                return known, old
            sets = sets_of(old)
            mine = lo.grow(sets, slots_for(self.master, memory), old.moe_layers, old.n_experts, old.top_k)
            self.members.append(Member(name, memory, node_url, sum(len(v) for v in mine.values())))
            try:
                new = await self.router.worker.call(self.write, sets + [mine])
            except BaseException:
                self.members.pop()
                raise
            self.save()
            await self._adopt_everywhere(old, new)
            await self.router.add_peer(node_url)
            log.info("%s joined with %.2f GB: group %d, %d of %d experts; manifest %s", name, memory / 1e9,
                     new.n_groups - 1, self.members[-1].experts, new.n_experts * len(new.moe_layers), new.hash)
            return new.n_groups - 1, new

    async def _adopt_everywhere(self, old: Manifest, new: Manifest) -> None:
        """Every member node serves the new manifest (one that is not up yet is brought along by
        `reconcile` once it is), then the router."""
        await self._adopt([mb for mb in self.members[:-1]], new, quiet=False)
        await self.router.adopt(self.router.frontend_factory)

    async def _adopt(self, members: list[Member], m: Manifest, quiet: bool) -> list[Member]:
        """Tell `members` to serve `m` (a call naming no manifest: a node still on an older one takes it)."""
        import aiohttp

        from mlxmoe.cluster.client import NodeClient

        done = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl_context)) as http:
            for mb in members:
                try:
                    await NodeClient(http, mb.node_url, self.key, None).call("adopt", {"manifest": m.to_dict()},
                                                                             timeout=30)
                    done.append(mb)
                except Exception as e:  # noqa: BLE001 (reconcile tries again)
                    (log.debug if quiet else log.info)("member %s (%s) has not adopted manifest %s yet: %s",
                                                       mb.name, mb.node_url, m.hash, e)
        return done

    async def reconcile(self, every: float = 2.0) -> None:
        """For as long as it runs: a member whose node the router does not have up (it was loading,
        or down, when the plan changed) is told the current manifest, then probed."""
        while True:
            await asyncio.sleep(every)
            try:
                live = {p.url for p in self.router.peers.live()}
                behind = [mb for mb in self.members if mb.node_url not in live]
                if behind:
                    for mb in await self._adopt(behind, self.layout, quiet=True):
                        await self.router.add_peer(mb.node_url)
            except Exception:  # noqa: BLE001 (never let the loop die)
                log.exception("reconciling members")

    async def enroll(self, request: web.Request) -> web.Response:
        body = await request.content.read(ENROLL_MAX + 1)
        if len(body) > ENROLL_MAX:
            raise web.HTTPRequestEntityTooLarge(max_size=ENROLL_MAX, actual_size=len(body))
        check_enroll_signature(self.key, request.headers.get(ENROLL_HEADER), body)
        doc = parse_enroll(body)
        host = doc.get("host") or request.remote
        node_url = f"https://{'[' + host + ']' if ':' in host else host}:{doc['port']}"
        try:
            group, m = await self.add(doc["name"], doc["memory"], node_url)
        except MlxMoeError as e:
            raise web.HTTPBadRequest(text=str(e)) from None
        parts = self.members[0].node_url
        return web.json_response({"group": group, "manifest": m.to_dict(), "parts": parts})


# ------------------------------------------------------------------ a member

async def enroll(coordinator: str, key: bytes, ssl_context, name: str, memory: int, port: int,
                 host: str | None = None, timeout: float = 120.0) -> dict:
    """Ask the coordinator (its join server, `https://host:port`) for this Mac's part."""
    import aiohttp

    body = json.dumps({"name": name, "memory": int(memory), "port": int(port),
                       **({"host": host} if host else {})}).encode()
    headers = {ENROLL_HEADER: enroll_signature(key, body), "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context)) as http:
        try:
            async with http.post(f"{coordinator}/enroll", data=body, headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                text = await r.text()
                if r.status != 200:
                    raise MlxMoeError(f"{coordinator} refused to enroll this Mac ({r.status}): {text[:300]}")
                return json.loads(text)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise MlxMoeError(f"cannot reach the cluster's first Mac at {coordinator}: {type(e).__name__}: {e}") from None


def part_dir(home: Path, manifest: Manifest) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", manifest.model_id).strip("-") or "model"
    return home / "bundles" / safe


def start_node_process(children: Children, home: Path, bundle: Path, group: int, host: str, port: int,
                       log_path: Path) -> subprocess.Popen:
    """The coordinator's own node, as `mlxmoe node` in a child process (one thread drives MLX per process) that
    stops with this one, even killed (mlxmoe/children.py: its port is not left taken)."""
    return children.start(["node", str(bundle), "--group", str(group), "--host", host, "--port", str(port)],
                          log_path, env={"MLXMOE_HOME": str(home)}, mode="ab")
