"""`mlxmoe copy`: copy what one node needs from a bundle (manifest, tokenizer,
trunk, its group, the overlay), with a progress bar, verifying each file's
sha256 against the manifest. Destination is a directory: a disk, a mounted
share, or a folder you then rsync to the Mac."""

from __future__ import annotations

import shutil
from pathlib import Path


from mlxmoe.errors import MlxMoeError
from mlxmoe.bundle.manifest import FILENAME, OVERLAY_FILE, TRUNK_FILE, Manifest, group_file, heal_file


def node_files(m: Manifest, groups: list[int]) -> list[str]:
    meta = [n for n, f in m.files.items() if f["role"] == "meta"]
    extra = [OVERLAY_FILE] if OVERLAY_FILE in m.files else []
    healed = [heal_file(g) for g in groups if heal_file(g) in m.files]
    return meta + [TRUNK_FILE] + [group_file(g) for g in groups] + extra + healed


def copy_bundle(src, dest, groups: list[int], advance=lambda n: None) -> list[str]:
    src, dest = Path(src), Path(dest)
    m = Manifest.load(src)
    bad = [g for g in groups if not 0 <= g < m.n_groups]
    if bad:
        raise MlxMoeError(f"--group {bad[0]}: this bundle has groups 0..{m.n_groups - 1}")
    names = node_files(m, groups)
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        tmp = dest / f".{name}.part"
        with open(src / name, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(1 << 24):
                fo.write(chunk)
                advance(len(chunk))
        tmp.rename(dest / name)
    shutil.copy2(src / FILENAME, dest / FILENAME)
    m.verify_files(dest, names)  # sizes + sha256: a bad copy is reported, not used
    return names
