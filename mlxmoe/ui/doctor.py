"""`mlxmoe doctor`: check this Mac's setup and the cluster; say what to fix.

Every check returns `Check(name, status, detail, fix)` with status "ok",
"warn" or "fail"; `fix` is one line a newcomer can act on. Checks never
raise: a broken optional piece is reported, not crashed on.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from dataclasses import asdict, dataclass

from mlxmoe.ui import DEFAULT_URL, base_url, demo_url, fetch_status, human_bytes

MIN_FREE_BYTES = 8 * 2**30  # below this even the trunk of a small MoE will not fit


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""


def check_mlx() -> Check:
    try:
        import mlx.core as mx
    except Exception as e:  # ImportError, or a broken native library
        return Check("mlx", "fail", f"cannot import mlx: {e}", "pip install mlx (on a Mac: native arm64 Python, not Rosetta)")
    device = mx.default_device()
    if getattr(mx, "metal", None) is not None and mx.metal.is_available():
        backend = "Metal"
    elif getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        backend = "CUDA"
    else:
        backend = "CPU"
    detail = f"mlx {getattr(mx, '__version__', '?')}, backend {backend}, default device {device}"
    if backend == "CPU":
        fix = ("MLX sees no GPU: use an arm64 Python (not x86 under Rosetta) and `pip install -U mlx`"
               if sys.platform == "darwin" else "CPU only: fine for tests and the demo, far too slow for a real model")
        return Check("mlx", "warn", detail, fix)
    return Check("mlx", "ok", detail)


def check_moe_path() -> Check:
    """Which single-token MoE path a node on this machine will take."""
    try:
        from mlxmoe.model import fused
    except Exception as e:  # mlx missing or broken: check_mlx says so
        return Check("moe path", "warn", f"cannot tell ({e})", "fix the mlx check above first")
    path = fused.default_path()
    what = {"fused-metal": "fused Metal kernels", "fused-cuda": "fused CUDA kernels",
            "reference": "plain MLX on the selected experts, float32", "mlx-lm": "mlx-lm's own MoE code"}[path]
    detail = (f"{path} ({what}); a node checks it on load and reports the one it uses in `/status` "
              "(moe_path, and fused_layers: decoder layers run whole by the kernels)")
    if path in ("reference", "mlx-lm") and mx_has_gpu():
        return Check("moe path", "warn", detail, "this MLX offers no custom kernels: `pip install -U mlx`")
    return Check("moe path", "ok", detail)


def check_cpu_blas() -> Check:
    """On a Linux CPU, whether MLX's float32 matmuls run on a fast BLAS."""
    try:
        from mlxmoe.quality import blas

        status, detail, fix = blas.verdict(blas.measure())
    except Exception as e:  # mlx missing or broken: check_mlx says so
        return Check("cpu blas", "warn", f"cannot tell ({e})", "fix the mlx check above first")
    return Check("cpu blas", status, detail, fix)


def mx_has_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() != mx.cpu


def check_memory() -> Check:
    try:
        import psutil
    except ImportError:
        return Check("memory", "warn", "psutil not installed, cannot read memory", "pip install psutil")
    vm = psutil.virtual_memory()
    detail = f"{human_bytes(vm.total)} total, {human_bytes(vm.available)} available"
    if vm.available < MIN_FREE_BYTES:
        return Check("memory", "warn", detail, "close large apps; `mlxmoe plan` shows what each Mac needs")
    return Check("memory", "ok", detail)


def check_mdns(timeout: float = 3.0) -> Check:
    fix = ("allow Local Network access for your terminal/Python (System Settings > Privacy & Security > "
           "Local Network) and let UDP port 5353 through the firewall")
    try:
        from zeroconf import Zeroconf
    except ImportError:
        return Check("mdns", "fail", "zeroconf not installed", "pip install zeroconf")
    result: list = []

    def probe():  # in a thread: a stuck socket must not hang the doctor
        try:
            zc = Zeroconf()
            zc.close()
            result.append(None)
        except Exception as e:
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return Check("mdns", "warn", f"Bonjour did not start within {timeout:.0f} s", fix)
    if result[0] is not None:
        return Check("mdns", "warn", f"Bonjour (mDNS) does not work here: {result[0]}; peers will not be found", fix)
    return Check("mdns", "ok", "Bonjour (mDNS) socket opens")


def check_key() -> Check:
    from mlxmoe.cluster import keys  # the same rules `mlxmoe node`/`serve` apply

    path = keys.default_path()
    if not path.exists():
        return Check("cluster key", "fail", f"no cluster key at {path}",
                     "on your first Mac run `mlxmoe init`; copy the same key file to the others")
    if not keys.is_private(path):
        mode = stat.S_IMODE(path.stat().st_mode)
        return Check("cluster key", "fail", f"{path} is readable by others (mode {mode:o})", f"chmod 600 {path}")
    try:
        keys.load_key(path)
    except keys.ClusterKeyError as e:
        return Check("cluster key", "fail", str(e), "recreate it with `mlxmoe init --force` and copy it to every Mac")
    return Check("cluster key", "ok", f"{path} (mode 600)")


def check_cert(soon_days: int = 30) -> Check:
    """This Mac's cluster certificate: present, signed by the cluster CA, in date
    (the same files `mlxmoe node`/`serve` load; cluster/tls.py)."""
    import datetime as dt
    from mlxmoe.cluster import keys, tls

    ident = tls.Identity.in_dir(keys.default_path().parent)
    name = "certificate"
    if not ident.ca.exists():
        return Check(name, "fail", f"no cluster CA at {ident.ca}",
                     "on your first Mac run `mlxmoe init`; copy ca.pem (and ca.key) beside cluster.key on the others")
    for secret in (ident.ca_key, ident.key):
        if secret.exists() and not keys.is_private(secret):
            return Check(name, "fail", f"{secret} is readable by others", f"chmod 600 {secret}")
    if not ident.cert.exists():
        if ident.ca_key.exists():
            return Check(name, "warn", f"no certificate at {ident.cert} yet",
                         "`mlxmoe node` / `mlxmoe serve` issue it at first start (the CA key is here)")
        return Check(name, "fail", f"no certificate at {ident.cert} and no CA key to issue one",
                     "on the Mac with ca.key run `mlxmoe init --node NAME` and copy its files here")
    fix = ("delete cert.pem; `mlxmoe node`/`serve` issue a new one at start" if ident.ca_key.exists() else
           "on the Mac with ca.key run `mlxmoe init --node NAME` and copy its files here")
    try:
        bad = tls.cert_problem(ident.cert.read_bytes(), ident.ca.read_bytes())
        if bad is None:
            bad = tls.cert_problem(ident.cert.read_bytes(), ident.ca.read_bytes(),
                                   now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=soon_days))
            if bad is not None:
                return Check(name, "warn", f"{ident.cert} {bad.replace('expired', 'expires')}", fix)
        if bad is None and not ident.key.exists():
            bad = f"its key {ident.key} is missing"
    except OSError as e:
        bad = f"cannot read it ({e})"
    if bad is not None:
        return Check(name, "fail", f"{ident.cert}: {bad}", fix)
    return Check(name, "ok", f"{ident.cert}: {tls.cert_name(ident.cert.read_bytes())}, signed by the cluster CA")


def _node_log_hint() -> str:
    """This system's log place first; the peer may be the other kind."""
    from mlxmoe.ui import service

    mac, linux = service.log_hint("node", "darwin"), service.log_hint("node", "linux")
    return f"{linux}; on a Mac {mac}" if sys.platform.startswith("linux") else f"{mac}; on Linux {linux}"


def check_cluster(url: str | None) -> tuple[list[Check], dict | None]:
    """Peers and manifest agreement from the router's /status. An unreachable
    router is a warning at the default address (maybe none runs yet) and a
    failure at an address the user named."""
    target = base_url(url or demo_url() or DEFAULT_URL)  # a running demo's router, else the default
    try:
        status = fetch_status(target)
    except (OSError, ValueError) as e:
        sev = "fail" if url else "warn"
        return [Check("router", sev, f"no mlxmoe router at {target} ({e})",
                      "start one with `mlxmoe serve`, or pass --url http://<router-mac>:8000")], None
    peers = status.get("peers") or []
    up = [p for p in peers if p.get("state") == "up"]
    checks = [Check("router", "ok", f"{target}: {status.get('model', '?')}, {len(up)}/{len(peers)} peers up")]
    if not up:
        checks.append(Check("peers", "fail", "no node is up", "start `mlxmoe node BUNDLE --group N` on each Mac"))
    for p in peers:
        if p.get("state") != "up":
            checks.append(Check(f"peer {p.get('name', '?')}", "warn",
                                f"{p.get('state', '?')}: {p.get('reason') or 'no reason given'}",
                                f"see that machine's node log ({_node_log_hint()}) or run `mlxmoe doctor` there"))
    want = status.get("manifest_hash")
    odd = [p.get("name", "?") for p in peers if want and p.get("manifest_hash") not in (None, want)]
    if odd:
        checks.append(Check("manifests", "fail", f"{', '.join(odd)} serve another manifest than the router ({want})",
                            "copy the same bundle (same distribution.json) to every Mac, then restart their nodes"))
    elif peers:
        checks.append(Check("manifests", "ok", f"all peers on manifest {str(want)[:12]}"))
    return checks, status


def check_bundle(bundle: str, cluster_hash: str | None = None, progress_mode: str = "quiet") -> list[Check]:
    """Validate distribution.json, then every file it lists: present, its size,
    and its sha256, as a node checks them before it loads (a bit flip found
    here is one the node would refuse). `progress_mode`: while hashing."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.errors import MlxMoeError

    try:
        m = Manifest.load(bundle)
    except MlxMoeError as e:
        return [Check("manifest", "fail", str(e), "point --bundle at a directory made by `mlxmoe split`")]
    checks = [Check("manifest", "ok", f"{m.model_id}, {m.n_groups} groups, manifest {m.hash}")]
    try:
        m.verify_files(bundle, check_hash=False)  # missing or short: said at once, before any hashing
        bad = corrupt_files(bundle, m, progress_mode)
    except MlxMoeError as e:
        checks.append(Check("bundle files", "fail", str(e),
                            "copy the bundle again (a node needs the trunk, the overlay and its own group file)"))
    except OSError as e:
        checks.append(Check("bundle files", "fail", f"{e.filename or bundle}: cannot read: {e.strerror or e}",
                            "check the disk and the file's permissions"))
    else:
        if bad:
            names, paths = ", ".join(bad), ", ".join(os.path.join(bundle, n) for n in bad)
            checks.append(Check("bundle files", "fail",
                                f"{paths}: sha256 does not match distribution.json (corrupt: a bad copy or a failing "
                                "disk); a node refuses this bundle",
                                f"copy {names} again from the bundle you split (`mlxmoe copy SRC {bundle} --group G` "
                                "copies a node's files and verifies them), or split again"))
        else:
            checks.append(Check("bundle files", "ok", f"{len(m.files)} files present, sizes and sha256 as the "
                                "manifest lists"))
    if cluster_hash and m.hash != cluster_hash:
        checks.append(Check("bundle vs cluster", "fail", f"this bundle is manifest {m.hash}, the router serves "
                            f"{cluster_hash}", "use the same bundle (same distribution.json) as the router"))
    return checks


def corrupt_files(bundle: str, m, progress_mode: str = "quiet") -> list[str]:
    """The bundle files whose sha256 is not the manifest's (sizes already checked).
    Hashed here in chunks, not with Manifest.verify_files, to show progress:
    a real bundle is hundreds of GB."""
    import hashlib
    from pathlib import Path

    from mlxmoe.progress import progress

    bad = []
    with progress(sum(f["size"] for f in m.files.values()), "checking sha256", progress_mode) as p:
        for name, meta in m.files.items():
            h = hashlib.sha256()
            with open(Path(bundle) / name, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    p.advance(len(chunk))
            if h.hexdigest() != meta["sha256"]:
                bad.append(name)
    return bad


def run_checks(url: str | None = None, bundle: str | None = None, progress_mode: str = "quiet") -> list[Check]:
    checks = [check_mlx(), check_moe_path(), check_cpu_blas(), check_memory(), check_mdns(), check_key(), check_cert()]
    cluster, status = check_cluster(url)
    checks += cluster
    if bundle:
        checks += check_bundle(bundle, (status or {}).get("manifest_hash"), progress_mode)
    return checks


def report(checks: list[Check], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"ok": not any(c.status == "fail" for c in checks), "checks": [asdict(c) for c in checks]},
                         indent=2))
        return
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, soft_wrap=True)  # let the terminal wrap; keeps lines greppable
    mark = {"ok": "[green]✓ ok  [/green]", "warn": "[yellow]! warn[/yellow]", "fail": "[red]✗ fail[/red]"}
    for c in checks:
        console.print(f"{mark[c.status]}  [bold]{escape(c.name)}[/bold]: {escape(c.detail)}")
        if c.fix and c.status != "ok":
            console.print(f"        [dim]fix:[/dim] {escape(c.fix)}")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    console.print(f"\n{fails} failed, {warns} warnings" if fails or warns else "\nall good")
