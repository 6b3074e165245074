import plistlib
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlxmoe.errors import MlxMoeError
from mlxmoe.ui import service
from mlxmoe.commands.service import service_cmd


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MLXMOE_CLUSTER_KEY_FILE", raising=False)
    monkeypatch.delenv("MLXMOE_HOME", raising=False)
    (tmp_path / "bundle dir").mkdir()
    return tmp_path


@pytest.fixture
def no_service_manager(monkeypatch):
    """Record launchctl/systemctl calls instead of running them."""
    calls = []
    monkeypatch.setattr(service, "_run", lambda cmd: calls.append(cmd))
    return calls


def test_launchd_plist(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    bundle = str(home / "bundle dir")
    path = service.unit_path("node")
    assert path == home / "Library" / "LaunchAgents" / "com.mlxmoe.node.plist"
    plist = plistlib.loads(service.render("node", bundle, 2))
    assert plist["Label"] == "com.mlxmoe.node"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "mlxmoe.cli", "node", bundle, "--group", "2"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["StandardOutPath"] == str(home / "Library" / "Logs" / "mlxmoe" / "node.log")
    assert plist["StandardErrorPath"] == str(home / "Library" / "Logs" / "mlxmoe" / "node.err.log")
    router = plistlib.loads(service.render("router", bundle))
    assert router["Label"] == "com.mlxmoe.router" and router["ProgramArguments"][3:] == ["serve", bundle]


def test_install_uninstall_macos(home, monkeypatch, no_service_manager):
    monkeypatch.setattr(sys, "platform", "darwin")
    out = service.install("both", bundle=str(home / "bundle dir"), group=0)
    for role in ("node", "router"):
        path = home / "Library" / "LaunchAgents" / f"com.mlxmoe.{role}.plist"
        assert f"wrote {path}" in out and f"started {role} service" in out
        assert plistlib.loads(path.read_bytes())["Label"] == f"com.mlxmoe.{role}"
    assert (home / "Library" / "Logs" / "mlxmoe").is_dir()
    assert no_service_manager[0][:2] == ["launchctl", "bootstrap"]
    out = service.uninstall("both")
    assert out[0] == f"removed {home}/Library/LaunchAgents/com.mlxmoe.node.plist"
    assert not list((home / "Library" / "LaunchAgents").iterdir())
    assert ["launchctl", "bootout"] == no_service_manager[-1][:2]


def test_systemd_unit_paths_and_content(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert service.unit_path("router") == home / ".config" / "systemd" / "user" / "mlxmoe-router.service"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "xdg"))
    assert service.unit_path("node") == home / "xdg" / "systemd" / "user" / "mlxmoe-node.service"
    unit = service.render("node", str(home / "bundle dir"), 1).decode()
    assert f'ExecStart={sys.executable} -m mlxmoe.cli node "{home}/bundle dir" --group 1\n' in unit
    assert "Restart=always" in unit and "WantedBy=default.target" in unit


def test_systemd_quoting():
    q = service._systemd_quote
    assert q("plain") == "plain"
    assert q("a b") == '"a b"'
    assert q('say "hi"') == '"say \\"hi\\""'
    assert q("100%") == "100%%" and q("$HOME") == "$$HOME"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed (apt-get install -y systemd)")
def test_systemd_analyze_verify(home, monkeypatch, no_service_manager):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("MLXMOE_CLUSTER_KEY_FILE", str(home / "my key%1"))
    service.install("both", bundle=str(home / "bundle dir"), group=3)
    for role in ("node", "router"):
        path = home / ".config" / "systemd" / "user" / f"mlxmoe-{role}.service"
        # --user needs a running user manager; the system-mode check parses the same syntax.
        r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "mlxmoe" not in r.stderr, r.stderr  # no warnings about our unit
    assert ["systemctl", "--user", "enable", "--now", "mlxmoe-node.service"] in no_service_manager


def test_dry_run_writes_nothing(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    r = CliRunner().invoke(service_cmd, ["install", "--role", "node", "--bundle", str(home / "bundle dir"),
                                         "--group", "2", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "# would write" in r.output and "ExecStart=" in r.output and "--group 2" in r.output
    assert "systemctl --user enable --now mlxmoe-node.service" in r.output
    assert not (home / ".config").exists()
    r = CliRunner().invoke(service_cmd, ["uninstall", "--dry-run"])
    assert r.exit_code == 0 and "no service installed" in r.output


def test_bad_input(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    r = CliRunner().invoke(service_cmd, ["install", "--role", "node", "--dry-run"])
    assert r.exit_code == 1 and "needs --bundle PATH" in r.output
    with pytest.raises(MlxMoeError, match="bundle directory not found: /nope"):
        service.install("router", bundle="/nope")
    with pytest.raises(MlxMoeError, match="the node service needs --group G"):
        service.install("node", bundle=str(home / "bundle dir"))
    with pytest.raises(MlxMoeError, match="unknown service role"):
        service.roles("both-ish")


def test_start_failure_is_reported_not_raised(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(service, "_run", lambda cmd: "Failed to connect to bus")
    out = service.install("router", bundle=str(home / "bundle dir"))
    assert out[-1] == "could not start router: `systemctl --user daemon-reload` failed: Failed to connect to bus"
    assert service.unit_path("router").exists()


def test_up_service_first_mac_and_member(home, monkeypatch, no_service_manager):
    """--role up: the first Mac's unit runs `mlxmoe up SOURCE`, a member's a bare `mlxmoe up` (it restarts
    from its config home's up.json, which must be there), with --memory, --port and --node-port passed on."""
    monkeypatch.setattr(sys, "platform", "linux")
    cli = f"ExecStart={sys.executable} -m mlxmoe.cli up"
    r = CliRunner().invoke(service_cmd, ["install", "--role", "up", "--source", "mlx-community/Qwen3-30B-A3B-4bit",
                                         "--memory", "48GB", "--port", "8001", "--node-port", "7421", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"{cli} mlx-community/Qwen3-30B-A3B-4bit --memory 48GB --port 8001 --node-port 7421\n" in r.output
    assert "mlxmoe-up.service" in r.output and "Description=mlxmoe up" in r.output
    assert not (home / ".config" / "systemd").exists()
    # a source that is a path is written absolute (the service starts in $HOME)
    monkeypatch.chdir(home)
    r = CliRunner().invoke(service_cmd, ["install", "--role", "up", "--source", "bundle dir", "--dry-run"])
    assert r.exit_code == 0 and f'{cli} "{home}/bundle dir"\n' in r.output, r.output
    # a member: nothing to restart from until it has joined once
    cfg = home / "cfg"
    monkeypatch.setenv("MLXMOE_HOME", str(cfg))
    r = CliRunner().invoke(service_cmd, ["install", "--role", "up", "--memory", "24GB", "--dry-run"])
    assert r.exit_code == 1 and "mlxmoe up --join TOKEN" in r.output and "Traceback" not in r.output, r.output
    cfg.mkdir()
    (cfg / "up.json").write_text('{"role": "member", "coordinator": "https://10.0.0.1:7419", "name": "b"}')
    out = service.install("up", memory="24GB")
    path = home / ".config" / "systemd" / "user" / "mlxmoe-up.service"
    assert out == [f"wrote {path}", "started up service"]
    unit = path.read_text()
    assert f"{cli} --memory 24GB\n" in unit and f"Environment=MLXMOE_HOME={cfg}\n" in unit
    assert ["systemctl", "--user", "enable", "--now", "mlxmoe-up.service"] in no_service_manager
    assert service.uninstall("up") == [f"removed {path}"] and not path.exists()


def test_up_service_launchd(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    plist = plistlib.loads(service.render("up", None, port=8000, source="reference-moe", memory="64GB"))
    assert plist["Label"] == "com.mlxmoe.up" and plist["KeepAlive"] is True
    assert plist["ProgramArguments"] == [sys.executable, "-m", "mlxmoe.cli", "up", "reference-moe", "--memory", "64GB",
                                         "--port", "8000"]
    assert plist["StandardErrorPath"] == str(home / "Library" / "Logs" / "mlxmoe" / "up.err.log")


def test_up_service_bad_input(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    r = CliRunner().invoke(service_cmd, ["install", "--role", "up", "--source", "x", "--memory", "lots", "--dry-run"])
    assert r.exit_code == 2 and "--memory" in r.output
    with pytest.raises(MlxMoeError, match="not --bundle or --group"):
        service.install("up", bundle=str(home / "bundle dir"), source="x")
    with pytest.raises(MlxMoeError, match="use them with --role up"):
        service.install("node", bundle=str(home / "bundle dir"), group=0, source="x")
    with pytest.raises(MlxMoeError, match="--peers is the router's"):
        service.install("up", source="x", peers="p.toml")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed (apt-get install -y systemd)")
def test_systemd_analyze_verify_up(home, monkeypatch, no_service_manager):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("MLXMOE_HOME", str(home / "config 100%"))
    service.install("up", source=str(home / "bundle dir"), memory="48GB", ports={"up": 8001, "node": 7421})
    path = home / ".config" / "systemd" / "user" / "mlxmoe-up.service"
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "mlxmoe" not in r.stderr, r.stderr


def test_menubar_controls_the_service_that_runs_this_macs_node(home, monkeypatch, no_service_manager):
    """`service install --role up` runs the node as up's child: the menu bar's Start/Stop drive that service."""
    monkeypatch.setattr(sys, "platform", "darwin")
    assert service.controlled_role() is None
    service.install("node", bundle=str(home / "bundle dir"), group=0)
    assert service.controlled_role() == "node"
    service.install("up", source="reference-moe")
    assert service.controlled_role() == "up"
