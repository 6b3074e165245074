"""Login services: launchd agents on macOS, systemd user units on Linux.

One service per role (`node`, `router`); `both` means one of each; `up` runs
`mlxmoe up` (this Mac's part of the cluster: with SOURCE on the first Mac,
bare on a member, which restarts from its config home's up.json). Files
land under the user's home (`Path.home()` honours $HOME, and
$XDG_CONFIG_HOME is honoured on Linux), so tests point HOME at a temp dir.
The service runs `<this python> -m mlxmoe.cli ...` by absolute path:
launchd and systemd start with a bare PATH, so a venv's `mlxmoe` script
would not be found.
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
from pathlib import Path

from mlxmoe.cluster.keys import config_home
from mlxmoe.errors import MlxMoeError

ROLES = ("node", "router")
DESCRIPTION = {"node": "mlxmoe node (serves one expert group)", "router": "mlxmoe router (OpenAI-compatible API)",
               "up": "mlxmoe up (this Mac's part of the cluster)"}


def roles(role: str) -> list[str]:
    if role == "both":
        return list(ROLES)
    if role not in ROLES and role != "up":
        raise MlxMoeError(f"unknown service role {role!r}: use node, router, both or up")
    return [role]


def is_macos(platform: str | None = None) -> bool:
    return (platform or sys.platform) == "darwin"


def controlled_role(platform: str | None = None) -> str | None:
    """The installed service that runs this Mac's node, for the menu bar's Start/Stop: `up` (its node is a
    child) else `node`; None when neither is installed."""
    return next((r for r in ("up", "node") if unit_path(r, platform).exists()), None)


def label(role: str) -> str:
    return f"com.mlxmoe.{role}"


def unit_path(role: str, platform: str | None = None) -> Path:
    if is_macos(platform):
        return Path.home() / "Library" / "LaunchAgents" / f"{label(role)}.plist"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "systemd" / "user" / f"mlxmoe-{role}.service"


def log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "mlxmoe"


def log_hint(role: str, platform: str | None = None) -> str:
    """Where a service's log is read on this system."""
    if is_macos(platform):
        return f"~/Library/Logs/mlxmoe/{role}.err.log"
    return f"journalctl --user -u mlxmoe-{role}"


def command(role: str, bundle: str | None, group: int | None = None, port: int | None = None,
            peers: str | None = None, *, source: str | None = None, memory: str | None = None,
            node_port: int | None = None) -> list[str]:
    """The argv the service runs: `mlxmoe node BUNDLE --group G [--port P]`,
    `mlxmoe serve BUNDLE [--port P] [--peers FILE]` (the router loads the
    bundle's trunk to place chats) or `mlxmoe up [SOURCE] [--memory M]
    [--port P] [--node-port N]`."""
    if role == "up":
        argv = [sys.executable, "-m", "mlxmoe.cli", "up"]
        if source is not None:  # a path as an absolute one (the service starts in $HOME); a repo id as it is
            argv.append(str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source)
        for opt, v in (("--memory", memory), ("--port", port), ("--node-port", node_port)):
            argv += [opt, str(v)] if v is not None else []
        return argv
    argv = [sys.executable, "-m", "mlxmoe.cli", "node" if role == "node" else "serve",
            str(Path(bundle).expanduser().resolve())]
    if role == "node":
        argv += ["--group", str(group)]
    if port is not None:
        argv += ["--port", str(port)]
    if peers is not None and role == "router":
        argv += ["--peers", str(Path(peers).expanduser().resolve())]  # the service starts in $HOME
    return argv


def _env() -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}  # log lines appear as they happen
    for var in ("MLXMOE_CLUSTER_KEY_FILE", "MLXMOE_HOME"):  # the config home: keys, certificate, up.json
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def launchd_plist(role: str, argv: list[str]) -> bytes:
    logs = log_dir()
    return plistlib.dumps({
        "Label": label(role),
        "ProgramArguments": argv,
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 10,  # a crashing service restarts every 10 s, not in a hot loop
        # launchd throttles CPU/IO of "Background" agents; inference must not be.
        "ProcessType": "Interactive",
        "WorkingDirectory": str(Path.home()),
        "EnvironmentVariables": _env(),
        "StandardOutPath": str(logs / f"{role}.log"),
        "StandardErrorPath": str(logs / f"{role}.err.log"),
    })


def _systemd_quote(arg: str) -> str:
    # systemd expands %specifiers and $VARS in ExecStart; double both.
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not re.search(r'[\s"\'\\;]', arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(role: str, argv: list[str]) -> str:
    env = "".join(f"Environment={_systemd_quote(f'{k}={v}')}\n" for k, v in _env().items())
    return (f"[Unit]\nDescription={DESCRIPTION[role]}\n\n"
            f"[Service]\nExecStart={' '.join(_systemd_quote(a) for a in argv)}\n"
            f"{env}WorkingDirectory=%h\nRestart=always\nRestartSec=10\n\n"
            f"[Install]\nWantedBy=default.target\n")


def render(role: str, bundle: str | None, group: int | None = None, platform: str | None = None,
           port: int | None = None, peers: str | None = None, **up) -> bytes:
    argv = command(role, bundle, group, port, peers, **up)
    return launchd_plist(role, argv) if is_macos(platform) else systemd_unit(role, argv).encode()


def _run(cmd: list[str]) -> str | None:
    """Run a service-manager command; return None on success, else why not."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"


def _start_cmds(role: str) -> list[list[str]]:
    if is_macos():
        return [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(unit_path(role))]]
    return [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", f"mlxmoe-{role}.service"]]


def _stop_cmds(role: str) -> list[list[str]]:
    if is_macos():
        return [["launchctl", "bootout", f"gui/{os.getuid()}/{label(role)}"]]
    return [["systemctl", "--user", "disable", "--now", f"mlxmoe-{role}.service"]]


def _shown(cmds: list[list[str]]) -> str:
    return " ; ".join(" ".join(c) for c in cmds)


def _run_all(cmds: list[list[str]]) -> str | None:
    for cmd in cmds:
        if err := _run(cmd):
            return f"`{' '.join(cmd)}` failed: {err}"
    return None


def start(role: str) -> str | None:
    """Load and start the installed service; None on success, else why not."""
    return _run_all(_start_cmds(role))


def stop(role: str) -> str | None:
    return _run_all(_stop_cmds(role))


def install(role: str, *, bundle: str | None = None, group: int | None = None, dry_run: bool = False,
            start_now: bool = True, ports: dict[str, int] | None = None, peers: str | None = None,
            source: str | None = None, memory: str | None = None) -> list[str]:
    """Write (and start) the service file(s); return lines to show the user.
    `ports`: role -> the port it listens on (`up`: the router's; its node's under "node");
    `peers`: the router's --peers file; `source`, `memory`: `mlxmoe up`'s SOURCE and --memory."""
    out = []
    ports = ports or {}
    if peers is not None and "router" not in roles(role):
        raise MlxMoeError("--peers is the router's: use it with --role router or both")
    if role != "up" and (source or memory):
        raise MlxMoeError("--source and --memory are `mlxmoe up`'s: use them with --role up")
    for r in roles(role):
        if r == "up":
            if bundle or group is not None:
                raise MlxMoeError("the up service takes --source (the first Mac's model), not --bundle or --group")
            if source is None and not (config_home() / "up.json").is_file():
                raise MlxMoeError(f"the up service needs --source SOURCE on the first Mac; on another Mac run "
                                  f"`mlxmoe up --join TOKEN` once first (a bare `mlxmoe up` restarts it from "
                                  f"{config_home() / 'up.json'}, not found)")
            path = unit_path(r)
            content = render(r, None, port=ports.get("up"), source=source, memory=memory, node_port=ports.get("node"))
        else:
            if not bundle:
                raise MlxMoeError(f"the {r} service needs --bundle PATH (the bundle directory made by `mlxmoe split`)")
            if not Path(bundle).expanduser().is_dir():
                raise MlxMoeError(f"bundle directory not found: {bundle}")
            if r == "node" and group is None:
                raise MlxMoeError("the node service needs --group G (which expert group of the bundle this Mac serves)")
            path, content = unit_path(r), render(r, bundle, group, port=ports.get(r), peers=peers)
        if dry_run:
            out += [f"# would write {path}", content.decode()]
            if start_now:
                out += ["# then run: " + _shown(_start_cmds(r))]
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_macos():
            log_dir().mkdir(parents=True, exist_ok=True)
        if start_now and path.exists():
            stop(r)  # reinstall: unload the old definition first (errors: it was not loaded)
        path.write_bytes(content)
        out.append(f"wrote {path}")
        if start_now:
            err = start(r)
            out.append(f"could not start {r}: {err}" if err else f"started {r} service")
    return out


def uninstall(role: str, *, dry_run: bool = False) -> list[str]:
    out = []
    for r in roles(role):
        path = unit_path(r)
        if not path.exists():
            out.append(f"{r}: no service installed ({path} not found)")
            continue
        if dry_run:
            out += ["# would run: " + _shown(_stop_cmds(r)), f"# would remove {path}"]
            continue
        stop(r)  # an unloaded service is fine: we remove it either way
        path.unlink()
        out.append(f"removed {path}")
    return out
