"""The cluster key: 32 random bytes shared by every Mac of one cluster.

Stored as hex text in cluster.key (mode 0600) in the config home:
$MLXMOE_HOME, else $XDG_CONFIG_HOME/mlxmoe, else ~/.config/mlxmoe. Every node
RPC carries an HMAC made with it, so a device without the key gets nothing.
`MLXMOE_CLUSTER_KEY_FILE` overrides the key's own path.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from mlxmoe.errors import MlxMoeError

ENV_VAR = "MLXMOE_CLUSTER_KEY_FILE"
HOME_VAR = "MLXMOE_HOME"
KEY_BYTES = 32


class ClusterKeyError(MlxMoeError):
    """The key file is missing, unreadable or malformed (message says which and how to fix)."""

    status, code = 500, "cluster_key"  # this Mac's own file: no request of a client is at fault


def config_home() -> Path:
    """The folder of cluster.key, the CA and this Mac's certificate: $MLXMOE_HOME,
    else $XDG_CONFIG_HOME/mlxmoe, else ~/.config/mlxmoe."""
    env = os.environ.get(HOME_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mlxmoe"


def default_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return config_home() / "cluster.key"


def create_key(path: Path | None = None, force: bool = False) -> Path:
    """Write a new random key; refuse to overwrite an existing file unless force."""
    path = Path(path) if path else default_path()
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; keeping it (use --force to replace it, "
                              f"then copy the new key to every Mac)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def load_key(path: str | Path | None = None) -> bytes:
    path = Path(path).expanduser() if path else default_path()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ClusterKeyError(f"cluster key not found at {path}: run `mlxmoe init` on one Mac and copy "
                        f"the file to the same place on the others (or pass --key FILE)") from None
    except OSError as e:
        raise ClusterKeyError(f"cannot read cluster key {path}: {e}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ClusterKeyError(f"cluster key {path} is not hex text; recreate it with `mlxmoe init --force`") from None
    if len(key) < 16:
        raise ClusterKeyError(f"cluster key {path} is too short ({len(key)} bytes, need >= 16); "
                        f"recreate it with `mlxmoe init --force`")
    return key


def is_private(path: Path) -> bool:
    """True if only the owner can read the file."""
    return not (path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
