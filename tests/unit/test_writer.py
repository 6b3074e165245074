"""bundle/writer.py: the one bundle-writing policy (temp dir -> hashes ->
manifest -> atomic swap)."""

import pytest

from mlxmoe.bundle import writer
from mlxmoe.bundle.checkpoint import sha256_file
from mlxmoe.bundle.manifest import FILENAME, TRUNK_FILE, Manifest
from mlxmoe.bundle.split import split
from mlxmoe.errors import MlxMoeError


def _bundle(ckpt, out):
    return split(str(ckpt("olmoe")), out, 2, bits=None, trunk_bits=None)


def test_files_are_hashed_into_the_manifest(ckpt, tmp_path):
    m = _bundle(ckpt, tmp_path / "b")
    assert Manifest.load(tmp_path / "b").hash == m.hash
    for name, meta in m.files.items():
        p = tmp_path / "b" / name
        assert meta["size"] == p.stat().st_size and meta["sha256"] == sha256_file(p)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_interrupted_write_leaves_the_old_bundle_and_no_temp_dir(ckpt, tmp_path):
    out = tmp_path / "b"
    old = _bundle(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fill(tmp):
        (tmp / TRUNK_FILE).write_bytes(b"half a trunk")
        raise KeyboardInterrupt  # e.g. Ctrl-C midway

    with pytest.raises(KeyboardInterrupt):
        writer.write_bundle(out, fill, lambda files: pytest.fail("manifest built after an interrupted fill"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert Manifest.load(out).hash == old.hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_swap_restores_the_old_bundle(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b"
    old = _bundle(ckpt, out)
    real = type(out).rename

    def rename(self, target):
        if self.name == ".b.partial":
            raise OSError("rename failed (simulated)")
        return real(self, target)

    monkeypatch.setattr(type(out), "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        split(str(ckpt("olmoe")), out, 2, bits=None, trunk_bits=None, force=True)
    assert Manifest.load(out).hash == old.hash and (out / FILENAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_bad_manifest_writes_nothing(tmp_path):
    def fill(tmp):
        (tmp / "x.json").write_text("{}")
        return {"x.json": {"role": "meta"}}

    def manifest(files):
        assert files["x.json"]["size"] == 2 and len(files["x.json"]["sha256"]) == 64
        raise MlxMoeError("bad manifest (simulated)")

    with pytest.raises(MlxMoeError, match="simulated"):
        writer.write_bundle(tmp_path / "b", fill, manifest)
    assert list(tmp_path.iterdir()) == []
