"""`mlxmoe pull` (bundle/pull.py): only the byte ranges of the tensors one node
needs, from a hub that speaks Hugging Face's API (a local aiohttp server here,
HF_ENDPOINT pointing at it), written as a checkpoint split_pulled turns into
that node's bundle; resumable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from mlxmoe.bundle.checkpoint import SafetensorsFile, open_source
from mlxmoe.bundle.manifest import TRUNK_FILE, Manifest, group_file
from mlxmoe.bundle.pull import STATE, group_experts, plan_experts, pull, split_pulled
from mlxmoe.errors import CheckpointError

REPO = "tiny-org/tiny-moe"
COMMIT = "c0ffee" + "0" * 34
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
pytestmark = pytest.mark.timeout(600)


class Hub:
    """A local hub: the model listing (`/api/models/{repo}/revision/{rev}`, with
    sizes and git/LFS hashes) and `/{repo}/resolve/{rev}/{file}`, safetensors
    redirected to a CDN path as the real hub does, with single-range Range.
    Counts the file bytes it sends and the ranges asked for; `cut_after`: drop
    the connection once that many more bytes went out (one-shot)."""

    def __init__(self, root: Path):
        self.root = root
        self.sent = 0
        self.ranges: list[tuple[str, int, int]] = []
        self.cut_after: int | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self.info)
        app.router.add_get("/api/models/{owner}/{name}", self.info)
        app.router.add_get("/{owner}/{name}/resolve/{rev}/{file}", self.resolve)
        app.router.add_get("/cdn/{file}", self.file)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def files(self):
        return sorted(p for p in self.root.iterdir() if p.is_file())

    async def info(self, request):
        if f"{request.match_info['owner']}/{request.match_info['name']}" != REPO:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        siblings = []
        for p in self.files():
            data = p.read_bytes()
            s = {"rfilename": p.name, "size": len(data)}
            if p.suffix == ".safetensors":
                s.update(blobId="0" * 40, lfs={"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                               "pointerSize": 134})
            else:
                s["blobId"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            siblings.append(s)
        return web.json_response({"id": REPO, "modelId": REPO, "sha": COMMIT, "siblings": siblings,
                                  "private": False, "tags": []})

    async def resolve(self, request):
        if request.match_info["rev"] not in (COMMIT, "main"):
            return web.Response(status=404)
        name = request.match_info["file"]
        if name.endswith(".safetensors"):
            raise web.HTTPFound(f"/cdn/{name}")
        return await self.file(request)

    async def file(self, request):
        p = self.root / request.match_info["file"]
        if not p.is_file() or "/" in request.match_info["file"]:
            return web.Response(status=404)
        data = p.read_bytes()
        start, end, status = 0, len(data), 200
        rng = request.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            if m is None or int(m.group(1)) >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            start, end, status = int(m.group(1)), min(int(m.group(2) or len(data) - 1) + 1, len(data)), 206
        self.ranges.append((p.name, start, end))
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        body = data[start:end]
        if self.cut_after is not None and len(body) > self.cut_after:
            body, self.cut_after = body[: self.cut_after], None
            await resp.write(body)
            self.sent += len(body)
            await asyncio.sleep(0.05)
            request.transport.abort()
            return resp
        if self.cut_after is not None:
            self.cut_after -= len(body)
        await resp.write(body)
        self.sent += len(body)
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny qwen3_moe checkpoint in several shards (8 experts at each of 3 layers)."""
    import tiny
    d = tmp_path_factory.mktemp("pull-src")
    return tiny.make_checkpoint("qwen3_moe", d / "tiny-moe", seed=7, shard_size="100KB")


@pytest.fixture(scope="module")
def full(source, tmp_path_factory):
    """The full checkpoint split the usual way, 3 groups, quantized (4-bit experts, 8-bit trunk), overlay: expert 0."""
    from mlxmoe.bundle.split import split
    d = tmp_path_factory.mktemp("pull-full") / "bundle"
    split(str(source), d, 3, overlay={"all": [0]}, bits=4, group_size=32, trunk_bits=8)
    return d


@pytest.fixture
def hub(source, monkeypatch):
    import huggingface_hub.constants as hfc

    h = Hub(source)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield h
    h.stop()


def tensors_of(d: Path) -> dict[str, bytes]:
    src = open_source(str(d))
    return {n: f.read_bytes(n) for n, f in src.files.items()}


def header_bytes(d: Path) -> int:
    """What reading every shard's header costs: its 8-byte length, then the header."""
    import struct
    return sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in d.glob("*.safetensors"))


def expert_ids(names) -> set[tuple[int, int]]:
    return {(int(m.group(1)), int(m.group(2))) for n in names if (m := EXPERT.match(n))}


def test_one_group_of_three_pulls_the_trunk_and_only_that_groups_experts(source, hub, tmp_path):
    config = json.loads((source / "config.json").read_text())
    want = group_experts(config, 1, 3)
    assert want == {0: [3, 4, 5], 1: [3, 4, 5], 2: [3, 4, 5]}
    r = pull(REPO, tmp_path / "p", want)
    whole = sum(p.stat().st_size for p in hub.files())
    src, got = tensors_of(source), tensors_of(tmp_path / "p")
    experts = {n for n in src if EXPERT.match(n)}
    trunk = set(src) - experts
    assert set(got) == trunk | {n for n in experts if int(EXPERT.match(n).group(2)) in (3, 4, 5)}
    assert all(got[n] == src[n] for n in got)  # bit for bit
    assert expert_ids(got) == {(l, e) for l in range(3) for e in (3, 4, 5)}
    expert_bytes = sum(len(src[n]) for n in experts)
    pulled_experts = sum(len(got[n]) for n in got if EXPERT.match(n))
    assert pulled_experts == expert_bytes * 3 // 8  # 3 of 8 experts: "roughly a third"
    assert r["downloaded"] == hub.sent < whole and r["repo_bytes"] == whole
    assert r["pulled"] == sum(len(v) for v in got.values()) and r["reused"] == 0
    # the tokenizer and config came too; the state says it is complete; a second pull fetches no tensor
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json", STATE} <= names
    assert not [n for n in names if n.endswith(".partial")]
    meta = sum(p.stat().st_size for p in hub.files() if not p.name.endswith(".safetensors"))
    assert r["downloaded"] == header_bytes(source) + meta + r["pulled"]  # nothing else came over
    before = len(hub.ranges)
    again = pull(REPO, tmp_path / "p", want)
    index = (source / "model.safetensors.index.json").stat().st_size
    assert again["reused"] == again["pulled"] and again["downloaded"] == header_bytes(source) + index  # no tensor
    assert all(a in (0, 8) for _, a, b in hub.ranges[before:])


def test_the_pulled_group_splits_into_the_group_the_full_checkpoint_gives(source, full, hub, tmp_path):
    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node

    config = json.loads((source / "config.json").read_text())
    pull(REPO, tmp_path / "p", group_experts(config, 1, 3))
    m = split_pulled(tmp_path / "p", tmp_path / "b", 1, n_groups=3, bits=4, group_size=32, trunk_bits=8)
    assert set(m.files) >= {TRUNK_FILE, group_file(1)} and group_file(0) not in m.files
    # no overlay asked for here; the full bundle has one: compare with a full split without it
    from mlxmoe.bundle.split import split
    split(str(source), tmp_path / "plain", 3, bits=4, group_size=32, trunk_bits=8)
    for name in (TRUNK_FILE, group_file(1)):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    a, b = Node.load(str(tmp_path / "b"), 1, kv_bits=None), Node.load(str(tmp_path / "plain"), 1, kv_bits=None)
    prompt = a.encode("the quick brown fox")
    got = [e.token for e in a.generate(None, prompt, GenParams(max_tokens=8, temperature=0.0))]
    assert got == [e.token for e in b.generate(None, prompt, GenParams(max_tokens=8, temperature=0.0))]


def test_a_pull_for_a_plan_gives_that_plans_node_part_with_its_manifest(full, hub, tmp_path):
    want = plan_experts(full, 2)
    assert want[0] == [0, 6, 7]  # its group and the overlay
    pull(REPO, tmp_path / "p", want)
    m = split_pulled(tmp_path / "p", tmp_path / "b", 2, plan=full / "distribution.json")
    plan = Manifest.load(full)
    assert m.hash == plan.hash and Manifest.load(tmp_path / "b").hash == plan.hash  # joins that cluster
    from mlxmoe.bundle.copy import node_files
    plan.verify_files(tmp_path / "b", node_files(plan, [2]))
    with pytest.raises(CheckpointError, match="layer 0 expert.*group 1 needs"):  # another node's part is not here
        split_pulled(tmp_path / "p", tmp_path / "b1", 1, plan=full)


def test_a_pull_cut_halfway_resumes_without_fetching_done_tensors_again(source, hub, tmp_path):
    want = group_experts(json.loads((source / "config.json").read_text()), 0, 3)
    total = sum(len(v) for v in tensors_of(source).values())
    hub.cut_after = total // 4
    with pytest.raises(CheckpointError, match="run the same pull again to resume"):
        pull(REPO, tmp_path / "p", want, retries=0)
    state = json.loads((tmp_path / "p" / STATE).read_text())
    done = set(state["done"])
    assert done and not state.get("complete") and not (tmp_path / "p" / "model.safetensors.index.json").exists()
    with pytest.raises(CheckpointError):  # what was cut is not a checkpoint yet
        open_source(str(tmp_path / "p"))
    first = hub.sent
    n_ranges = len(hub.ranges)
    r = pull(REPO, tmp_path / "p", want)
    # where each done tensor lives in the source, and what the second run asked for
    where = {}
    for f in sorted(source.glob("*.safetensors")):
        for n, t in SafetensorsFile(f).tensors.items():
            where[n] = (f.name, t.start, t.end)
    for name, a, b in hub.ranges[n_ranges:]:
        for t in done:  # no range of the second run touches a tensor the first one finished
            f, s, e = where[t]
            assert not (f == name and a < e and s < b), (t, name, a, b)
    done_bytes = sum(where[t][2] - where[t][1] for t in done)
    index = (source / "model.safetensors.index.json").stat().st_size
    assert r["reused"] == done_bytes and r["downloaded"] == r["pulled"] - done_bytes + header_bytes(source) + index
    assert hub.sent - first == r["downloaded"]
    src, got = tensors_of(source), tensors_of(tmp_path / "p")
    assert all(got[n] == src[n] for n in got) and expert_ids(got) == {(l, e) for l in range(3) for e in (0, 1, 2)}


def test_a_tensor_whose_bytes_changed_on_disk_is_fetched_again(source, hub, tmp_path):
    want = group_experts(json.loads((source / "config.json").read_text()), 2, 3)
    pull(REPO, tmp_path / "p", want)
    src = open_source(str(tmp_path / "p"))
    name = sorted(src.files)[0]
    f, t = src.files[name], src.files[name].tensors[name]
    with open(f.path, "r+b") as fh:
        fh.seek(t.start)
        fh.write(b"\xff" * 4)
    r = pull(REPO, tmp_path / "p", want)
    assert r["reused"] == r["pulled"] - t.nbytes
    assert tensors_of(tmp_path / "p")[name] == tensors_of(source)[name]


def test_offline_and_unknown_repos_and_bad_selections_say_so(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    with pytest.raises(CheckpointError, match="no such model repo"):
        pull("nobody/nothing", tmp_path / "x")
    with pytest.raises(Exception, match="layer 9 is not an MoE layer"):
        pull(REPO, tmp_path / "x", {9: [0]})
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        pull(REPO, tmp_path / "y")


def test_the_pull_command(hub, tmp_path, full):
    from mlxmoe.cli import main

    r = CliRunner().invoke(main, ["pull", REPO, str(tmp_path / "p"), "--group", "1", "--groups", "3", "--json",
                                  "--bundle", str(tmp_path / "b"), "--bits", "4", "--group-size", "32"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["downloaded"] < out["repo_bytes"] and out["bundle"] == str(tmp_path / "b")
    assert Manifest.load(tmp_path / "b").files[group_file(1)]["size"] > 0
    r = CliRunner().invoke(main, ["pull", REPO, str(tmp_path / "q"), "--plan", str(full), "--group", "0", "--quiet",
                                  "--bundle", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "of the repo" in r.output and Manifest.load(tmp_path / "c").hash == Manifest.load(full).hash
    r = CliRunner().invoke(main, ["pull", REPO, str(tmp_path / "z"), "--group", "1"])
    assert r.exit_code == 2 and "--groups" in r.output


def test_mlxmoe_up_pulls_a_repo_it_does_not_have_then_splits_it(hub, tmp_path, source, monkeypatch):
    """`mlxmoe up REPO` on the first Mac: a repo id that is neither a directory nor in the Hugging Face cache
    is pulled into the config home (every tensor), then split once into the master bundle; a second start
    uses that bundle."""
    import functools

    from mlxmoe.bundle import split
    from mlxmoe.commands.up import ensure_master

    monkeypatch.setattr(split, "split", functools.partial(split.split, group_size=32))  # the tiny model's width

    master = ensure_master(tmp_path, REPO)
    m = Manifest.load(master)
    assert master == tmp_path / "bundles" / REPO.replace("/", "--") / "master" and m.n_groups == 1
    assert set(tensors_of(tmp_path / "bundles" / REPO.replace("/", "--") / "checkpoint")) == set(tensors_of(source))
    sent = hub.sent
    assert ensure_master(tmp_path, REPO) == master and hub.sent == sent
