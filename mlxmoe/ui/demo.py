"""`mlxmoe demo`: the whole system on one machine, offline.

Splits the bundled reference model into groups (once; cached), starts one
node per group and a router on loopback with a demo cluster key, waits until
every node is up, then opens `mlxmoe chat` against them (or, with --ask,
asks one question and exits). Ctrl-C stops everything it started."""

from __future__ import annotations

from mlxmoe import ASSETS

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlxmoe.errors import MlxMoeError

REFERENCE = ASSETS / "reference-moe"
# The best measured 3-group layout (docs/QUALITY.md): overlapping domain sets.
GROUPINGS = {3: ASSETS / "groupings" / "reference-moe-g3-domain-sets29.json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_bundle(root: Path, n_groups: int, quiet: bool) -> Path:
    """Split the reference model once; reuse the bundle while it validates."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.bundle.split import split

    out = root / f"reference-{n_groups}g"
    grouping = json.loads(GROUPINGS[n_groups].read_text()) if n_groups in GROUPINGS else None
    strategy = grouping["strategy"] if grouping else "contiguous"
    try:
        m = Manifest.load(out)
        m.verify_files(out, check_hash=False)
        if m.n_groups == n_groups and m.grouping.get("strategy") == strategy:
            return out
    except MlxMoeError:
        pass
    if not quiet:
        print(f"splitting the bundled reference model into {n_groups} groups -> {out}", file=sys.stderr)
    split(str(REFERENCE), out, n_groups, grouping=grouping, bits=8, group_size=64, trunk_bits=8, kv_bits=8, force=True)
    return out


def ensure_key(root: Path) -> Path:
    """The demo's cluster key, CA and certificate (in `root`: nodes and router
    load them beside --key, and talk mutual TLS like a real cluster)."""
    from mlxmoe.cluster import tls
    from mlxmoe.cluster.keys import create_key

    key = root / "demo-cluster.key"
    if not key.exists():
        create_key(key)
    if not tls.Identity.in_dir(root).ca.exists():
        tls.create_ca(root)
    tls.ensure_identity(root, "demo", ["127.0.0.1", "localhost"])  # once, before the processes start
    return key


def wait_ready(url: str, n_nodes: int, procs: list, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise MlxMoeError(f"a demo process exited early (exit code {dead[0].returncode}): {' '.join(dead[0].args[3:6])}")
        try:
            with urllib.request.urlopen(url + "/status", timeout=2) as r:
                status = json.load(r)
            if sum(p["state"] == "up" for p in status.get("peers", [])) >= n_nodes:
                return status
        except OSError:
            pass
        time.sleep(0.5)
    raise MlxMoeError(f"the demo cluster did not come up within {timeout:.0f}s (last status: {status})")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlxmoe.cli", *cmd], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_demo(root, groups: int, port: int, ask: str | None, as_json: bool, mode: str) -> int:
    """Start `groups` nodes and a router on loopback, then chat (or ask once);
    returns the exit code. Everything started is stopped on the way out."""
    from mlxmoe.ui.chat import run_interactive, run_once

    root_p = Path(root).expanduser()
    (root_p / "logs").mkdir(parents=True, exist_ok=True)
    quiet = bool(ask and as_json)
    bundle = ensure_bundle(root_p, groups, quiet)
    key = ensure_key(root_p)
    ports = [free_port() for _ in range(groups)]
    peers = root_p / "peers.toml"
    peers.write_text("".join(f'[[peers]]\nurl = "https://127.0.0.1:{p}"\n\n' for p in ports))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    procs = []
    try:
        for g, p in enumerate(ports):
            procs.append(start(["node", str(bundle), "--group", str(g), "--host", "127.0.0.1", "--port", str(p),
                                "--key", str(key), "--no-advertise"], root_p / "logs" / f"node-{g}.log"))
        procs.append(start(["serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--key", str(key),
                            "--peers", str(peers), "--no-mdns", "--mode", mode], root_p / "logs" / "router.log"))
        if not quiet:
            print(f"starting {groups} nodes and a router (logs in {root_p / 'logs'}) ...", file=sys.stderr)
        wait_ready(url, groups, procs)
        if not quiet:
            print(f"ready: OpenAI-compatible API at {url}/v1, status page at {url}/", file=sys.stderr)
        if ask:
            rc = run_once(url, ask, model=None, system=None, as_json=as_json)
        else:
            rc = run_interactive(url, model=None, system=None)
    except KeyboardInterrupt:
        rc = 130
    finally:
        stop(procs)
    return rc
