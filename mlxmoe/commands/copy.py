"""`mlxmoe copy`: the files one node needs from a bundle, verified."""

from __future__ import annotations

import json

import click

from mlxmoe.bundle.manifest import FILENAME
from mlxmoe.commands.options import clean_errors, progress_mode, progress_options


@click.command("copy")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--group", "groups", type=int, multiple=True, required=True, help="Group(s) the target Mac serves (repeatable).")
@progress_options("Print the copied files as JSON (progress as JSON lines on stderr).")
def copy_cmd(bundle, dest, groups, quiet, as_json):
    """Copy the files one node needs from BUNDLE to DEST, and verify them.

    A node needs the manifest, tokenizer and config files, the trunk, its own
    expert group and the overlay — not the other groups. Example, to a disk
    you then plug into the other Mac:

    \b
        mlxmoe copy ~/bundles/qwen3-30b /Volumes/USB/qwen3-30b --group 1

    Over the network, rsync these files from BUNDLE instead (a copy with
    --json prints the exact list, "files"):

    \b
        distribution.json, the config and tokenizer files
        trunk.safetensors
        experts-group-GG.safetensors   of each --group
        experts-overlay.safetensors    if the bundle has one
        heal-group-GG.safetensors      of each --group, if `calibrate --heal` made one

    The cluster secrets do not travel with the bundle: copy cluster.key,
    ca.pem and ca.key from ~/.config/mlxmoe/ (`mlxmoe init` prints how).
    """
    from mlxmoe.bundle.copy import copy_bundle, node_files
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.progress import progress

    def go():
        m = Manifest.load(bundle)
        total = sum(m.files[n]["size"] for n in node_files(m, list(groups)) if n in m.files)
        with progress(total, f"copy to {dest}", progress_mode(quiet, as_json)) as p:
            return copy_bundle(bundle, dest, list(groups), p.advance), total

    names, total = clean_errors(go)
    if as_json:
        click.echo(json.dumps({"dest": dest, "files": names + [FILENAME], "bytes": total}))
    else:
        click.echo(f"copied {len(names) + 1} files ({total / 1e6:.1f} MB) to {dest}; verified against the manifest")
