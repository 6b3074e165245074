"""The one way a bundle directory is written (by `split` and `calibrate`).

Files go to a temporary directory beside the target; every file is then
sized and sha256-hashed into the manifest, the manifest is validated and
written, and only then is the directory swapped into place. An interrupted
write leaves the old bundle (if any) untouched and no temporary directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from mlxmoe.bundle.checkpoint import sha256_file
from mlxmoe.bundle.manifest import Manifest


def write_bundle(out, fill: Callable[[Path], dict], manifest: Callable[[dict], Manifest]) -> Manifest:
    """`fill(tmp)` writes the files and returns {name: {"role": ...}};
    `manifest(files)` builds the Manifest once sizes and hashes are in. A file
    carried over unchanged (hard-linked) may come with its old size and sha256:
    kept when the size still matches, so a big bundle is not hashed again."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = fill(tmp)
        for name, meta in files.items():
            size = (tmp / name).stat().st_size
            if "sha256" not in meta or meta.get("size") != size:
                meta.update(size=size, sha256=sha256_file(tmp / name))
        m = manifest(files)
        m.validate(str(tmp))
        m.save(tmp)
        swap_in(tmp, out)
        return m
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, out: Path):
    """Rename `tmp` to `out`; an existing `out` is moved aside first and
    restored if the rename fails, so `out` is always a whole bundle."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
