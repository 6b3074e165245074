"""The rough edges a new user met: plan's counts on a small model, errors
with their prefix once, --group checked before MLX starts, the router's
warnings (no node up, a node with another key), doctor's log path, and
`service install --port/--peers`."""

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fakes
from mlxmoe.bundle.plan import human_count, size_unit
from mlxmoe.commands.plan import plan_cmd
from mlxmoe.ui import service

ROOT = str(Path(__file__).resolve().parents[2])
REFERENCE = str(Path(ROOT) / "mlxmoe" / "assets" / "reference-moe")


def cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "mlxmoe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# --- plan ------------------------------------------------------------------------------

def test_human_count():
    assert [human_count(n) for n in (512, 12_300, 17_500_000, 235.1e9, 1.2e12)] == ["512", "12.3K", "17.5M",
                                                                                     "235.1B", "1.2T"]
    assert size_unit(5e6) == ("MB", 1e6) and size_unit(3e9)[0] == "GB"


def test_plan_small_model_shows_millions_and_megabytes():
    r = CliRunner().invoke(plan_cmd, [REFERENCE])
    assert r.exit_code == 0, r.output
    assert "0.0B" not in r.output and "M parameters (" in r.output and "per node (MB)" in r.output
    assert "  total " in r.output and " 0.00\n" not in r.output.split("per node")[1].split("node 0")[0]


def test_plan_error_names_the_source_once():
    r = CliRunner().invoke(plan_cmd, ["qwen3-999b"])
    assert r.exit_code == 1
    assert r.output.count("qwen3-999b") == 1 and "Error: qwen3-999b: no such directory" in r.output


def test_missing_model_says_hf_download():
    r = CliRunner().invoke(plan_cmd, ["nobody/no-such-model"])
    assert r.exit_code == 1 and "`hf download nobody/no-such-model`" in r.output and "huggingface-cli" not in r.output
    assert r.output.count("nobody/no-such-model:") == 1


# --- --group is checked before anything loads -----------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from mlxmoe.ui.demo import ensure_bundle
    return str(ensure_bundle(tmp_path_factory.mktemp("b"), 2, quiet=True))


@pytest.mark.parametrize("verb", ["run", "node"])
@pytest.mark.parametrize("group", ["2", "-1", "99"])
def test_group_out_of_range_is_a_usage_error(bundle, verb, group):
    args = [verb, bundle, "--group", group] + (["-p", "hi"] if verb == "run" else ["--key", "/nonexistent"])
    r = cli(*args)
    assert r.returncode == 2, r.stderr  # never 134 (an abort from a thread left running)
    assert f"Invalid value for --group: {group}: this bundle has groups 0..1" in r.stderr
    assert "terminate called" not in r.stderr and "Traceback" not in r.stderr


def test_group_not_a_number(bundle):
    r = cli("run", bundle, "--group", "x", "-p", "hi")
    assert r.returncode == 2 and "'x': expected a group number, 'auto' or 'all'" in r.stderr


def test_node_on_a_broken_bundle_exits_cleanly(tmp_path, bundle):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(bundle).iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "trunk.safetensors").unlink()
    (bad / "trunk.safetensors").write_bytes(b"\0" * 100)
    from mlxmoe.cluster.keys import create_key
    from mlxmoe.cluster.tls import create_ca
    key = tmp_path / "k"
    create_key(key)
    create_ca(tmp_path)  # beside the key, as `mlxmoe init` leaves it: only the bundle is wrong
    r = cli("node", str(bad), "--group", "0", "--key", str(key), "--no-advertise", "--host", "127.0.0.1")
    assert r.returncode == 1 and "trunk.safetensors" in r.stderr and "terminate called" not in r.stderr


# --- the router says what is wrong ----------------------------------------------------

def test_router_warns_when_no_node_is_up(caplog):
    from mlxmoe.cluster.router import Router

    async def go():
        r = Router(fakes.FakeFrontend(), b"k" * 32, static_peers=["http://127.0.0.1:9"], mdns=False,
                   probe_interval=60)
        await r.start()
        await asyncio.sleep(0.2)
        await r.stop()

    with caplog.at_level(logging.WARNING, logger="mlxmoe.router"):
        asyncio.run(go())
    msgs = [rec.getMessage() for rec in caplog.records if rec.name == "mlxmoe.router"]
    assert any("no node is up: tried http://127.0.0.1:9 (info probe failed: cannot reach" in m for m in msgs), msgs


def test_router_warns_once_about_a_node_with_another_key(caplog):
    with caplog.at_level(logging.WARNING, logger="mlxmoe.router"):
        with fakes.LocalCluster([fakes.FakeEngine(group=0)]) as c:
            async def other_key():
                from mlxmoe.cluster.node_server import start_node
                n = await start_node(fakes.FakeEngine(group=1), b"x" * 32, "127.0.0.1", 0, advertise=False,
                                     tls=fakes.test_identity())  # a member's certificate, another cluster key
                c.router.peers.add_static(n.url)
                for _ in range(3):
                    await c.router.fleet.probe_all()
                await n.stop()
                return n.url
            url = c.run(other_key())
            assert any(p.state == "down" for p in c.router.peers.peers.values())
    key_msgs = [rec.getMessage() for rec in caplog.records if "cluster key" in rec.getMessage() and url in rec.getMessage()]
    assert len(key_msgs) == 1 and key_msgs[0].startswith(f"peer {url} ({url}) refuses our cluster key"), key_msgs
    assert caplog.records[[r.getMessage() for r in caplog.records].index(key_msgs[0])].levelno == logging.WARNING


# --- doctor's log path ------------------------------------------------------------------

def test_log_hint_per_platform():
    assert service.log_hint("node", "darwin") == "~/Library/Logs/mlxmoe/node.err.log"
    assert service.log_hint("node", "linux") == "journalctl --user -u mlxmoe-node"


def test_doctor_points_to_this_systems_log(monkeypatch):
    from mlxmoe.ui import doctor
    from ui_fake_server import FakeRouter, sample_status

    st = sample_status()
    st["peers"][2].update(state="down", reason="no answer")
    for platform, want, other in (("linux", "journalctl --user -u mlxmoe-node", "~/Library/Logs"),
                                  ("darwin", "~/Library/Logs/mlxmoe/node.err.log", "journalctl")):
        monkeypatch.setattr(sys, "platform", platform)
        with FakeRouter(status=st) as srv:
            checks, _ = doctor.check_cluster(srv.url)
        fix = next(c.fix for c in checks if c.name == "peer mac-2")
        assert fix.startswith(f"see that machine's node log ({want}") and "mlxmoe doctor" in fix


# --- service install --port / --peers ----------------------------------------------------

def test_service_command_with_port_and_peers(tmp_path):
    peers = str(tmp_path / "peers.toml")
    assert service.command("node", str(tmp_path), 1, port=7420)[-4:] == ["--group", "1", "--port", "7420"]
    argv = service.command("router", str(tmp_path), port=8080, peers=peers)
    assert argv[3:] == ["serve", str(tmp_path.resolve()), "--port", "8080", "--peers", str(Path(peers).resolve())]
    assert service.command("router", str(tmp_path))[3:] == ["serve", str(tmp_path.resolve())]


def test_service_install_cli_passes_port_and_peers(tmp_path, monkeypatch):
    from mlxmoe.commands.service import service_cmd

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    (tmp_path / "b").mkdir()
    (tmp_path / "peers.toml").write_text('[[peers]]\nurl = "http://10.0.0.2:7420"\n')
    run = CliRunner().invoke
    r = run(service_cmd, ["install", "--role", "router", "--bundle", str(tmp_path / "b"), "--port", "8080",
                          "--peers", str(tmp_path / "peers.toml"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "--port 8080 --peers " + str(tmp_path / "peers.toml") in r.output
    r = run(service_cmd, ["install", "--role", "both", "--bundle", str(tmp_path / "b"), "--group", "0",
                          "--node-port", "7420", "--router-port", "8081", "--dry-run"])
    assert r.exit_code == 0, r.output
    node_part, router_part = r.output.split("mlxmoe-router.service")[0], r.output.split("mlxmoe-router.service")[1]
    assert "--group 0 --port 7420" in node_part and "serve " in router_part and "--port 8081" in router_part
    # hostile: --port with both roles is ambiguous, --peers needs the router, ports in range
    r = run(service_cmd, ["install", "--role", "both", "--bundle", str(tmp_path / "b"), "--group", "0", "--port", "1"])
    assert r.exit_code == 2 and "--node-port" in r.output and "--router-port" in r.output
    r = run(service_cmd, ["install", "--role", "node", "--bundle", str(tmp_path / "b"), "--group", "0",
                          "--peers", str(tmp_path / "peers.toml")])
    assert r.exit_code == 2 and "--peers" in r.output and "router" in r.output
    r = run(service_cmd, ["install", "--role", "node", "--bundle", str(tmp_path / "b"), "--group", "0", "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output
    r = run(service_cmd, ["install", "--role", "router", "--bundle", str(tmp_path / "b"),
                          "--peers", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "nope.toml" in r.output
