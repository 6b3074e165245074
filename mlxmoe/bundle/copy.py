"""`mlxmoe copy`: copy what one node needs from a bundle (manifest, tokenizer,
trunk, its group, the overlay), with a progress bar, verifying each file's
sha256 against the manifest. Destination is a directory: a disk, a mounted
share, or a folder you then rsync to the Mac."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from mlxmoe.errors import MlxMoeError
from mlxmoe.bundle.manifest import FILENAME, OVERLAY_FILE, TRUNK_FILE, Manifest, group_file


def node_files(m: Manifest, groups: list[int]) -> list[str]:
    meta = [n for n, f in m.files.items() if f["role"] == "meta"]
    extra = [OVERLAY_FILE] if OVERLAY_FILE in m.files else []
    return meta + [TRUNK_FILE] + [group_file(g) for g in groups] + extra


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


@click.command("copy")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--group", "groups", type=int, multiple=True, required=True, help="Group(s) the target Mac serves (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the copied files as JSON (progress as JSON lines on stderr).")
def copy_cmd(bundle, dest, groups, quiet, as_json):
    """Copy the files one node needs from BUNDLE to DEST, and verify them.

    A node needs the manifest, tokenizer and config files, the trunk, its own
    expert group and the overlay — not the other groups. Example, to a disk
    you then plug into the other Mac:

        mlxmoe copy ~/bundles/qwen3-30b /Volumes/USB/qwen3-30b --group 1

    Over the network, rsync the same files: `mlxmoe copy --help` lists them
    as the JSON output of a local copy.
    """
    from mlxmoe.progress import progress

    try:
        m = Manifest.load(bundle)
        total = sum(m.files[n]["size"] for n in node_files(m, list(groups)) if n in m.files)
        mode = "quiet" if quiet else "json" if as_json else "bar"
        with progress(total, f"copy to {dest}", mode) as p:
            names = copy_bundle(bundle, dest, list(groups), p.advance)
    except MlxMoeError as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(json.dumps({"dest": dest, "files": names + [FILENAME], "bytes": total}))
    else:
        click.echo(f"copied {len(names) + 1} files ({total / 1e6:.1f} MB) to {dest}; verified against the manifest")
