"""Option sets several commands share, defined once. Help texts a command
words its own way are passed in (the words are part of its behaviour)."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import click

from mlxmoe.errors import MlxMoeError
from mlxmoe import progress, units
from mlxmoe.modes import ROUTER_MODES

BITS = ["2", "3", "4", "5", "6", "8", "16"]
TRUNK_BITS = ["4", "5", "6", "8", "16"]
KV_BITS = ["4", "8", "16"]
GROUP_SIZES = ["32", "64", "128"]

KEY_HELP = "Cluster key file (default: $MLXMOE_CLUSTER_KEY_FILE or ~/.config/mlxmoe/cluster.key)."
IFACE_HELP = "Use Bonjour only on the interface with this IPv4 address (default: all interfaces)."


def bits_or_none(x: str | None) -> int | None:
    """A bits choice as the library takes it: "16" means unquantized (None)."""
    return None if x is None or int(x) == 16 else int(x)


def kv_options(bits_help: str, group_help: str):
    """--kv-bits / --kv-group-size (default: what the bundle says)."""
    def deco(f):
        f = click.option("--kv-group-size", type=click.Choice(GROUP_SIZES), default=None, help=group_help)(f)
        return click.option("--kv-bits", type=click.Choice(KV_BITS), default=None, help=bits_help)(f)
    return deco


def mode_option(default: str | None, help: str, show_default: bool = False):
    return click.option("--mode", type=click.Choice(ROUTER_MODES), default=default, show_default=show_default, help=help)


def key_option(f):
    return click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None, help=KEY_HELP)(f)


def tls_option(f):
    return click.option("--insecure-plain-http", "plain_http", is_flag=True,
                        help="Talk to nodes over plain HTTP, without the cluster CA (tests only: anyone on the "
                             "network reads every prompt and answer).")(f)


def load_tls(key_file: str | None, plain_http: bool, name: str, bind: str | None = None):
    """This Mac's cluster TLS identity (None with --insecure-plain-http): the CA
    and certificate beside the cluster key, the certificate issued at first
    start if the CA key is there."""
    if plain_http:
        return None
    from pathlib import Path
    from mlxmoe.cluster import keys, tls
    d = (Path(key_file).expanduser() if key_file else keys.default_path()).parent
    try:
        return tls.ensure_identity(d, name, tls.default_hosts(bind))
    except (tls.TlsError, OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def interface_option(f):
    return click.option("--interface", default=None, metavar="IP", help=IFACE_HELP)(f)


def verbose_option(f):
    return click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(f)


LOG_LEVELS = ["debug", "info", "warning", "error"]


def log_options(f):
    """-v, --log-level and --log-json (servers: `serve`, `node`), passed as
    verbose, log_level, log_json."""
    f = click.option("--log-json", is_flag=True,
                     help="Log one JSON object per line (access lines carry their fields as keys).")(f)
    f = click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
                     help="Least severe log level shown; info shows one access line per request.")(f)
    return verbose_option(f)


def progress_option():
    """`--progress [bar|quiet|json]` (passed as `progress_mode`), default bar."""
    return click.option("--progress", "progress_mode", type=click.Choice(progress.MODES), default="bar", show_default=True,
                        help="How to show progress on stderr: a bar, nothing, or JSON lines for scripts.")


def parse_size(text: str | None, option: str) -> int | None:
    """units.parse_size, its error as click's for `option`."""
    try:
        return units.parse_size(text, option)
    except ValueError as e:
        raise click.BadParameter(str(e).removeprefix(f"{option}: "), param_hint=option) from None


def progress_options(json_help: str):
    """--quiet / --json for commands that show a progress bar."""
    def deco(f):
        f = click.option("--json", "as_json", is_flag=True, help=json_help)(f)
        return click.option("--quiet", is_flag=True, help="No progress output.")(f)
    return deco


def progress_mode(quiet: bool, as_json: bool) -> str:
    return "quiet" if quiet else "json" if as_json else "bar"


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def clean_errors(fn, *args, **kw):
    """Call the library; the project's own errors become one clear CLI line."""
    try:
        return fn(*args, **kw)
    except MlxMoeError as e:
        raise click.ClickException(str(e)) from None


def url_option(what: str = "The mlxmoe router"):
    from mlxmoe.ui import DEFAULT_URL

    # None: mlxmoe.ui.base_url() resolves it (a running demo's router, else DEFAULT_URL).
    return click.option("--url", default=None, envvar="MLXMOE_URL",
                        help=f"{what} (default: a running `mlxmoe demo`'s router, else {DEFAULT_URL}). Env: MLXMOE_URL.")


def setup_logging(verbose: bool, level: str = "info", as_json: bool = False) -> None:
    """Logs on stderr; -v is --log-level debug."""
    import logging

    handler = logging.StreamHandler()
    if as_json:
        from mlxmoe.cluster.accesslog import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else getattr(logging, level.upper()), handlers=[handler],
                        force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # our own access lines replace aiohttp's


def load_key(path: str | None) -> bytes:
    from mlxmoe.cluster import keys

    try:
        return keys.load_key(path)
    except keys.ClusterKeyError as e:
        raise click.ClickException(str(e)) from None


def check_port(host: str, port: int) -> None:
    """Fail fast, before any model loads or thread starts, when --port is taken
    (a bind error after the engine thread started could end in an abort)."""
    from mlxmoe.ui.demo import check_port as check

    if port:  # 0: the system picks a free one
        clean_errors(check, port, host)


def run_server(coro, host: str | None = None, port: int | None = None) -> None:
    """asyncio.run, with the project's own errors shown as one clear line."""
    import asyncio
    import errno

    try:
        asyncio.run(coro)
    except MlxMoeError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE and port:  # taken after check_port looked
            from mlxmoe.ui.demo import port_in_use
            raise click.ClickException(port_in_use(port, host or "127.0.0.1")) from None
        raise click.ClickException(f"cannot start: {e}") from None


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face repo id: owner/name


def check_source(source: str, what: str = "directory") -> None:
    """A SOURCE that looks like a path and is not there gets "no such ...", never
    the `hf download` hint, which only a repo id (owner/name) gets."""
    if Path(source).expanduser().exists() or REPO_ID.fullmatch(source):
        return
    if source.startswith(("/", ".", "~")) or os.sep in source or (os.altsep and os.altsep in source):
        raise click.ClickException(f"no such {what}: {source}")


def api_key_option(f):
    return click.option("--api-key", "api_key", envvar="MLXMOE_API_KEY", default=None, metavar="KEY|FILE",
                        help="Require an API key ('Authorization: Bearer KEY' or 'x-api-key: KEY') on the APIs and "
                             "/status: the key, or a file of keys (one a line; each client's sessions are its own). "
                             "Required with a router address other than loopback. Env: MLXMOE_API_KEY.")(f)


def api_keys(value: str | None) -> list[str]:
    """--api-key: a path to a file of keys (one a line, # comments), or the key itself."""
    if not value:
        return []
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise click.ClickException(f"--api-key: {value} holds no key")
        return keys
    return [value.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve anywhere


def check_bind(host: str, keys: list[str]) -> None:
    """An API reachable from the network needs a key (SECURITY.md)."""
    if not keys and not is_loopback(host):
        raise click.ClickException(f"--host {host} opens the API to the network: give it an API key "
                                   "(--api-key KEY|FILE or MLXMOE_API_KEY), or keep --host 127.0.0.1")
