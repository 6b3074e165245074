"""A new user's first hour: what they met and what they now get. doctor
hashes a bundle (a flipped bit a node refuses is found there), `run` prints
mlx-lm's rates and peak memory, a model without a chat template says --raw,
split validates before its bar, and a taken port is one clear line from
`serve`, `node` and `demo`, with nothing left running and nothing "ready"."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

ROOT = str(Path(__file__).resolve().parents[2])
REFERENCE = str(Path(ROOT) / "mlxmoe" / "assets" / "reference-moe")
IN_USE = "is in use (another mlxmoe or another program); choose another with --port"
# Skips the command's own port check, as when another program takes the port after it looked.
NO_PRECHECK = ("import sys; from mlxmoe.ui import demo; demo.check_port = lambda *a, **k: None; "
               "sys.argv[0] = 'mlxmoe'; from mlxmoe.cli import main; main()")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from mlxmoe.ui.demo import ensure_bundle
    return ensure_bundle(tmp_path_factory.mktemp("b"), 2, quiet=True)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PYTHONPATH": ROOT, "XDG_CONFIG_HOME": str(tmp_path / "config"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def taken():
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def key(tmp_path):
    from mlxmoe.cluster.keys import create_key
    create_key(tmp_path / "k")
    return str(tmp_path / "k")


def cli(env, *args, boot=None, timeout=120):
    cmd = [sys.executable, "-c", boot, *args] if boot else [sys.executable, "-m", "mlxmoe.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def running_with(marker: str) -> list[int]:
    """Processes (not zombies) whose command line names `marker`."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
                out.append(p.info["pid"])
        except (psutil.Error, TypeError):
            pass
    return [p for p in out if p != os.getpid()]


def one_clean_line(r, port: int, host: str = "127.0.0.1"):
    assert r.returncode not in (0, None) and r.returncode > 0, (r.returncode, r.stderr)
    assert r.stderr == f"Error: port {port} on {host} {IN_USE}\n", r.stderr
    for bad in ("Traceback", "Unclosed", "ready", "terminate called"):
        assert bad not in r.stderr + r.stdout


# --- 1. doctor hashes ------------------------------------------------------------------

def test_doctor_finds_the_flipped_bit_a_node_refuses(bundle, tmp_path, monkeypatch):
    from mlxmoe.commands.doctor import doctor_cmd
    from mlxmoe.ui import doctor

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "trunk.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "trunk.safetensors").write_bytes(bytes(data))
    for name in ("check_mlx", "check_moe_path", "check_cpu_blas", "check_memory", "check_mdns", "check_key",
                 "check_cert"):
        monkeypatch.setattr(doctor, name, lambda n=name: doctor.Check(n, "ok", "fine"))
    monkeypatch.setattr(doctor, "check_cluster", lambda url: ([], None))
    r = CliRunner().invoke(doctor_cmd, ["--bundle", str(bad), "--json"])
    assert r.exit_code == 1
    c = json.loads(r.output)["checks"][-1]
    assert c["status"] == "fail" and f"{bad / 'trunk.safetensors'}: sha256 does not match" in c["detail"]
    assert "copy trunk.safetensors again" in c["fix"]
    r = CliRunner().invoke(doctor_cmd, ["--bundle", str(bundle), "--json"])
    assert r.exit_code == 0 and "sizes and sha256" in r.output


# --- 2, 3. run ---------------------------------------------------------------------------

def test_run_prints_rates_and_peak_memory(bundle, env):
    r = cli(env, "run", str(bundle), "--group", "1", "--raw", "-p", "Once upon a time", "-m", "8")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "None" not in r.stderr
    assert any(ln.startswith("Prompt: 5 tokens, ") and ln.endswith(" tokens-per-sec") for ln in lines), lines
    assert any(ln.startswith("Generation: ") for ln in lines), lines
    assert any(ln.startswith("Peak memory: ") and " GB" in ln for ln in lines), lines
    r = cli(env, "run", str(bundle), "--group", "1", "--raw", "-p", "Once upon a time", "-m", "8", "--json")
    out = json.loads(r.stdout)
    assert out["prompt_tok_s"] > 0 and out["peak_memory_gb"] > 0 and out["peak_memory_source"]


def test_run_without_a_chat_template_says_raw(bundle, tmp_path, env):
    from mlxmoe.bundle.checkpoint import sha256_file
    from mlxmoe.bundle.manifest import Manifest

    nt = tmp_path / "no-template"
    nt.mkdir()
    for f in bundle.iterdir():
        if f.name not in ("tokenizer_config.json", "distribution.json"):
            (nt / f.name).symlink_to(f)
    cfg = json.loads((bundle / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (nt / "tokenizer_config.json").write_text(json.dumps(cfg))
    m = Manifest.load(bundle)
    m.files["tokenizer_config.json"].update(size=(nt / "tokenizer_config.json").stat().st_size,
                                            sha256=sha256_file(nt / "tokenizer_config.json"))
    m.save(nt)
    for group in ("0", "auto"):
        r = cli(env, "run", str(nt), "--group", group, "-p", "hi", "-m", "2")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr == (f"Error: {nt}: this model has no chat template (none in its tokenizer files); "
                            "use --raw to send the prompt as plain text\n")
    assert cli(env, "run", str(nt), "--group", "0", "--raw", "-p", "hi", "-m", "2").returncode == 0


# --- 5. split validates before its bar ----------------------------------------------------

def test_split_error_draws_no_bar(bundle, tmp_path):
    from mlxmoe.cli import main

    for args in ([REFERENCE, str(bundle), "--groups", "2"],  # OUT exists, no --force
                 [REFERENCE, str(tmp_path / "o"), "--groups", "99"]):
        r = CliRunner().invoke(main, ["split", *args])
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "split reference-moe" not in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1


# --- 7. taken ports ----------------------------------------------------------------------------

def test_serve_on_a_taken_port(bundle, env, taken, key):
    one_clean_line(cli(env, "serve", str(bundle), "--port", str(taken), "--no-mdns"), taken)
    # taken after the check looked: the bind fails with the router started; it closes what it opened
    r = cli(env, "serve", str(bundle), "--port", str(taken), "--no-mdns", "--key", key, "--insecure-plain-http",
            boot=NO_PRECHECK)
    assert r.returncode == 1 and r.stderr.endswith(f"Error: port {taken} on 127.0.0.1 {IN_USE}\n"), r.stderr
    assert "Unclosed" not in r.stderr and "Traceback" not in r.stderr
    assert running_with(f"--port {taken}") == []


def test_node_on_a_taken_port(bundle, env, taken):
    r = cli(env, "node", str(bundle), "--group", "0", "--host", "127.0.0.1", "--port", str(taken), "--no-advertise")
    one_clean_line(r, taken)
    assert running_with(f"--port {taken}") == []


def test_start_router_closes_its_session_when_the_port_is_taken(taken):
    import fakes
    from mlxmoe.cluster.api import start_router
    from mlxmoe.cluster.router import Router

    async def go():
        r = Router(fakes.FakeFrontend(), b"k" * 32, static_peers=[], mdns=False, probe_interval=60)
        with pytest.raises(OSError):
            await start_router(r, "127.0.0.1", taken)
        return r

    r = asyncio.run(go())
    assert r.fleet.http is not None and r.fleet.http.closed and all(t.done() for t in r.fleet._tasks)


def test_demo_on_a_taken_port(env, taken, tmp_path):
    r = cli(env, "demo", "--serve", "--groups", "2", "--port", str(taken), "--dir", str(tmp_path / "demo"))
    one_clean_line(r, taken)
    assert not (tmp_path / "demo").exists()  # failed before any work


@pytest.mark.timeout(300)
def test_demo_whose_router_dies_is_never_ready(bundle, env, taken):
    """The port is taken after the demo looked: its router child dies, and the demo says so,
    stops the nodes and exits non-zero; it never points at the other program."""
    root = bundle.parent  # the module's split: the demo reuses it
    start = time.time()
    r = cli(env, "demo", "--serve", "--groups", "2", "--port", str(taken), "--dir", str(root), boot=NO_PRECHECK,
            timeout=240)
    assert r.returncode == 1, r.stderr
    assert "ready" not in r.stderr and "Traceback" not in r.stderr and "Unclosed" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"Error: the demo's router exited (exit code 1): port {taken} on 127.0.0.1 {IN_USE}; "
                           f"log: {root / 'logs' / 'router.log'}"), r.stderr
    assert not (Path(env["XDG_CONFIG_HOME"]) / "mlxmoe" / "demo.json").exists()
    end = time.time() + 20
    while running_with(str(root)) and time.time() < end:
        time.sleep(0.2)
    assert running_with(str(root)) == [], "demo children left running"
    assert time.time() - start < 200
