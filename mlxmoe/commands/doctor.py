"""`mlxmoe doctor`: check this Mac's setup and the cluster."""

from __future__ import annotations

import sys

import click

from mlxmoe.ui import DEFAULT_URL


@click.command("doctor")
@click.option("--url", default=None, envvar="MLXMOE_URL",
              help=f"Router to check (default: a running `mlxmoe demo`'s router, else {DEFAULT_URL}; "
                   "only a warning if none runs there). Env: MLXMOE_URL.")
@click.option("--bundle", type=click.Path(file_okay=False, path_type=str), help="Bundle directory to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_cmd(url, bundle, as_json):
    """Check this Mac's setup and the cluster, and say what to fix.

    Looks at MLX and its GPU backend, memory, Bonjour (mDNS), the cluster key,
    the router's peers and their manifests, and a bundle if you name one
    (every file's size and sha256 against its manifest, as a node checks them).
    Exits non-zero when any check fails.
    """
    from mlxmoe.ui import doctor

    from mlxmoe.progress import is_terminal

    # hashing a big bundle takes minutes: a bar on a terminal, nothing in a log or with --json
    checks = doctor.run_checks(url=url, bundle=bundle,
                               progress_mode="bar" if is_terminal(sys.stderr) and not as_json else "quiet")
    doctor.report(checks, as_json=as_json)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)
