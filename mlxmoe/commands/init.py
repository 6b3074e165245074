"""`mlxmoe init`: create the cluster key and the cluster CA shared by your Macs."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from mlxmoe.cluster import keys, tls


def _tilde(p: Path) -> str:
    return "~/" + str(p.relative_to(Path.home())) if str(p).startswith(str(Path.home())) else str(p)


@click.command("init")
@click.option("--path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the key (default: ~/.config/mlxmoe/cluster.key, or $MLXMOE_CLUSTER_KEY_FILE). "
                   "The CA and certificates go in the same folder.")
@click.option("--force", is_flag=True, help="Replace an existing key and CA (every Mac then needs the new ones).")
@click.option("--node", "node_name", default=None, metavar="NAME",
              help="Only issue a certificate for the Mac NAME, signed by this Mac's cluster CA (for Macs you do not "
                   "give ca.key); written to --out.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="With --node: folder for ca.pem, cert.pem and cert.key (default: ./NAME).")
@click.option("--host", "hosts", multiple=True, metavar="IP|NAME",
              help="With --node: an address the certificate also names (repeatable).")
def init_cmd(path, force, node_name, out, hosts):
    """Create the cluster key and the cluster CA shared by your Macs.

    The key is a random secret: nodes and the router sign every request with
    it. The CA signs each Mac's certificate: router and nodes talk mutual TLS
    and accept only peers whose certificate this CA signed, so a device on
    your network without them gets nothing and reads nothing. Run this once,
    on one Mac, then copy the folder's cluster.key, ca.pem and ca.key to the
    same place on the others; each Mac issues its own certificate at first
    start. To keep ca.key on this Mac only, issue each other Mac's
    certificate here with `mlxmoe init --node NAME` and copy that instead.
    """
    key_path = Path(path).expanduser() if path else keys.default_path()
    if node_name:
        return _issue_for(key_path.parent, node_name, out, list(hosts))
    try:
        keys.create_key(key_path, force=force)
        wrote_key = True
    except FileExistsError as e:
        if tls.Identity.in_dir(key_path.parent).ca.exists():
            raise click.ClickException(str(e)) from None
        wrote_key = False  # a key from before TLS: add the CA beside it
    ident = tls.create_ca(key_path.parent, force=True)
    name = socket.gethostname().split(".")[0] or "mac"
    tls.issue_into(ident, name, tls.default_hosts())
    d = _tilde(key_path.parent)
    files = " ".join(str(key_path.parent / f) for f in (key_path.name, tls.CA_CERT, tls.CA_KEY))
    click.echo(f"Wrote {'a new cluster key to ' + str(key_path) + ' and ' if wrote_key else ''}a new cluster CA "
               f"({ident.ca}, key {ident.ca_key}; keys readable only by you), and this Mac's certificate.\n\n"
               f"Copy the key and the CA to each of your other Macs, for example:\n"
               f"  ssh OTHER-MAC 'mkdir -p {d}' && scp {files} OTHER-MAC:{d}/\n"
               f"  ssh OTHER-MAC 'chmod 600 {d}/{key_path.name} {d}/{tls.CA_KEY}'\n"
               f"(or keep {tls.CA_KEY} here: `mlxmoe init --node OTHER-MAC` issues its certificate to copy instead).\n\n"
               f"Then on every Mac: `mlxmoe node BUNDLE --group N`, and on the one you chat from: "
               f"`mlxmoe serve BUNDLE`.")


def _issue_for(key_dir: Path, name: str, out: str | None, hosts: list[str]) -> None:
    ident = tls.Identity.in_dir(key_dir)
    if not ident.ca.exists() or not ident.ca_key.exists():
        raise click.ClickException(f"no cluster CA with its key in {key_dir}: run `mlxmoe init` first "
                                   f"(on the Mac that has ca.key)")
    dest = tls.Identity.in_dir(out or name)
    if dest.ca.resolve() == ident.ca.resolve():
        raise click.ClickException("--out must be another folder than this Mac's own (it would replace cert.pem)")
    try:
        cert, key = tls.issue_cert(ident.ca.read_bytes(), ident.ca_key.read_bytes(), name, [name + ".local", *hosts])
    except ValueError as e:
        raise click.ClickException(f"cannot issue a certificate: {e}") from None
    tls.write_private(dest.key, key)
    tls.write_public(dest.cert, cert)
    tls.write_public(dest.ca, ident.ca.read_bytes())
    click.echo(f"Issued a certificate for {name} in {dest.cert.parent} (ca.pem, cert.pem, cert.key).\n"
               f"Copy these three files beside cluster.key on {name} (~/.config/mlxmoe/); chmod 600 cert.key.")
