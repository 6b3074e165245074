"""Mutual TLS between router and nodes (cluster/tls.py, docs/SECURITY.md):
a peer without a certificate the cluster CA signed gets nothing, not even an
HTTP status; a member works; a plain-HTTP request to a TLS node gets nothing."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat

import aiohttp
import pytest
from click.testing import CliRunner

import fakes
from fakes import HASH, FakeEngine, LocalCluster
from mlxmoe import wire
from mlxmoe.cluster import tls
from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.node_server import start_node
from mlxmoe.errors import PeerError, RpcError
from mlxmoe.node.remote.peers import PeerLink

KEY = b"t" * 32
pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- pure: CA and certificates
def test_issued_cert_is_signed_named_and_dated():
    ca, ca_key = tls.make_ca()
    cert, key = tls.issue_cert(ca, ca_key, "mini", ["10.0.0.5", "mini.local"])
    assert tls.cert_problem(cert, ca) is None and tls.cert_name(cert) == "mini"
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=tls.CERT_DAYS + 1)
    assert tls.cert_problem(cert, ca, now=later).startswith("expired on ")
    other_ca, _ = tls.make_ca()
    assert tls.cert_problem(cert, other_ca) == "not signed by this cluster's CA"
    assert tls.cert_problem(ca, ca) is None  # the CA is self-signed: doctor checks cert.pem, not ca.pem
    assert tls.cert_problem(b"junk", ca).startswith("not a PEM certificate")


def test_a_tls_router_dials_every_peer_over_https():
    from mlxmoe.cluster.discovery import PeerTable
    t = PeerTable("h1", 3, tls=True)
    assert t.add_static("http://10.0.0.2:7420").url == "https://10.0.0.2:7420"  # an old peers file
    assert t.add_static("https://10.0.0.3:7420").url == "https://10.0.0.3:7420"
    t.from_mdns("old", {"name": "old", "url": "http://10.0.0.4:7420", "txt": {"groups": "1"}})  # no tls=1
    assert t.peers["old"].url == "https://10.0.0.4:7420"
    assert PeerTable("h1", 3).add_static("http://10.0.0.2:7420").url == "http://10.0.0.2:7420"


def test_ensure_identity_issues_at_first_start_and_needs_a_ca(tmp_path):
    with pytest.raises(tls.TlsError, match="no cluster CA"):
        tls.ensure_identity(tmp_path, "n", [])
    tls.create_ca(tmp_path)
    ident = tls.ensure_identity(tmp_path, "n", ["127.0.0.1"])
    assert ident.problem() is None
    for p in (ident.key, ident.ca_key):
        assert not p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    first = ident.cert.read_bytes()
    assert tls.ensure_identity(tmp_path, "n", []).cert.read_bytes() == first  # valid: kept
    ident.ca_key.unlink()  # a Mac without the CA key and without a certificate cannot make one
    ident.cert.unlink()
    with pytest.raises(tls.TlsError, match="no CA key"):
        tls.ensure_identity(tmp_path, "n", [])


# ---------------------------------------------------------------- a TLS node
def _ctx(cert: tuple[bytes, bytes] | None, tmp_path, trust: bytes | None = None) -> ssl.SSLContext:
    """A client context presenting `cert` (or none), trusting `trust` (default: the test CA)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=(trust or fakes.test_identity().ca.read_bytes()).decode())
    if cert is not None:
        (tmp_path / "c.pem").write_bytes(cert[0])
        (tmp_path / "c.key").write_bytes(cert[1])
        ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    return ctx


def _self_signed() -> tuple[bytes, bytes]:
    ca, ca_key = tls.make_ca("mallory")
    return ca, ca_key  # a CA certificate is as self-signed as it gets


def _other_ca_cert() -> tuple[bytes, bytes]:
    ca, ca_key = tls.make_ca("another cluster")
    return tls.issue_cert(ca, ca_key, "mallory", ["127.0.0.1"])


def _signed_info(n) -> bytes:
    """A signed `info` for node `n` in its current run (its name and epoch, as /hello gives them)."""
    data, headers = wire.encode_request(KEY, "info", {}, HASH, nonce=wire.new_nonce(), dst=n.server.name,
                                        epoch=n.server.epoch)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST /rpc/info HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n{head}\r\n").encode() + data


def _exchange(n, ctx: ssl.SSLContext | None) -> bytes:
    """Send node `n` a correctly signed `info` request; everything that came back (b"" or an exception name)."""
    raw = socket.create_connection(("127.0.0.1", n.port), timeout=5)
    try:
        s = ctx.wrap_socket(raw) if ctx else raw
        s.sendall(_signed_info(n))
        got = b""
        while len(got) < 1 << 16:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got:
                break
        return got
    except (ssl.SSLError, OSError) as e:
        return type(e).__name__.encode()
    finally:
        raw.close()


@pytest.fixture(scope="module")
def node():
    c = LocalCluster([FakeEngine(group=0)], key=KEY)  # for its event loop thread only
    with c:
        n = c.run(start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False, tls=fakes.test_identity()))
        yield c, n
        c.run(n.stop())


@pytest.mark.parametrize("who", ["no certificate", "self-signed", "another CA's certificate", "plain HTTP"])
def test_a_peer_without_a_cluster_certificate_gets_nothing(node, who, tmp_path):
    c, n = node
    ctx = {"no certificate": lambda: _ctx(None, tmp_path), "self-signed": lambda: _ctx(_self_signed(), tmp_path),
           "another CA's certificate": lambda: _ctx(_other_ca_cert(), tmp_path),
           "plain HTTP": lambda: None}[who]()
    before = n.server.bytes_in
    got = _exchange(n, ctx)
    assert b"HTTP/" not in got, got[:200]  # not even a 401: the handshake failed first
    assert n.server.bytes_in == before  # the request never reached the RPC handler


def test_a_member_works_and_the_router_refuses_a_node_of_another_ca(node, tmp_path):
    c, n = node
    assert n.url.startswith("https://")
    assert b"HTTP/1.1 200" in _exchange(n, tls.client_context(fakes.test_identity()))

    async def rpc(ctx):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            return await NodeClient(http, n.url, KEY, HASH).call("info")
    assert c.run(rpc(fakes.client_context()))["group"] == 0
    # a node whose certificate another CA signed is not ours: the router does not talk to it
    with pytest.raises(RpcError) as e:
        ident = fakes.test_identity()
        c.run(rpc(_ctx((ident.cert.read_bytes(), ident.key.read_bytes()), tmp_path, trust=tls.make_ca()[0])))
    assert e.value.code == "unreachable" and e.value.retryable


def test_peer_links_dial_with_the_cluster_certificate(node):
    c, n = node
    link = PeerLink(n.url, KEY, HASH, context=fakes.client_context())
    body, nbytes = link.call("info", {})
    assert body["group"] == 0 and nbytes > 0
    body, _ = link.call("info", {})  # kept alive over TLS
    link.close()
    from mlxmoe.node.remote import peers
    saved, peers._client_context = peers._client_context, None
    try:
        with pytest.raises(PeerError, match="no cluster certificate"):
            PeerLink(n.url, KEY, HASH).call("info", {})
    finally:
        peers._client_context = saved


def test_local_cluster_runs_over_tls():
    with LocalCluster([FakeEngine(group=0), FakeEngine(group=1)], key=KEY) as c:
        import openai
        cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="x", max_retries=0, timeout=20)
        out = cl.chat.completions.create(model=c.router.model, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4)
        assert out.choices[0].message.content
        assert all(p.url.startswith("https://") for p in c.router.peers.peers.values())


# ---------------------------------------------------------------- commands
def test_init_makes_key_ca_and_certificate_and_issues_for_another_mac(tmp_path, monkeypatch):
    from mlxmoe.commands.init import init_cmd
    key = tmp_path / "cfg" / "cluster.key"
    r = CliRunner().invoke(init_cmd, ["--path", str(key)])
    assert r.exit_code == 0, r.output
    ident = tls.Identity.in_dir(key.parent)
    assert ident.problem() is None and "ca.key" in r.output
    assert not os.stat(ident.ca_key).st_mode & 0o077
    r = CliRunner().invoke(init_cmd, ["--path", str(key)])
    assert r.exit_code != 0 and "already exists" in r.output
    out = tmp_path / "mini"
    r = CliRunner().invoke(init_cmd, ["--path", str(key), "--node", "mini", "--out", str(out), "--host", "10.0.0.5"])
    assert r.exit_code == 0, r.output
    other = tls.Identity.in_dir(out)
    assert other.problem() is None and tls.cert_name(other.cert.read_bytes()) == "mini"
    assert not other.ca_key.exists()  # the CA key stays where it is
    r = CliRunner().invoke(init_cmd, ["--path", str(key), "--node", "x", "--out", str(key.parent)])
    assert r.exit_code != 0 and "another folder" in r.output


def test_node_without_a_ca_says_how_to_fix(tmp_path):
    from mlxmoe.commands.options import load_tls
    import click
    with pytest.raises(click.ClickException, match="mlxmoe init"):
        load_tls(str(tmp_path / "cluster.key"), False, "n")
    assert load_tls(str(tmp_path / "cluster.key"), True, "n") is None  # --insecure-plain-http


def test_doctor_checks_the_certificate(tmp_path, monkeypatch):
    from mlxmoe.ui import doctor
    monkeypatch.setenv("MLXMOE_CLUSTER_KEY_FILE", str(tmp_path / "cluster.key"))
    c = doctor.check_cert()
    assert c.status == "fail" and "mlxmoe init" in c.fix
    ident = tls.create_ca(tmp_path)
    assert doctor.check_cert().status == "warn"  # issued at first start
    tls.ensure_identity(tmp_path, "mini", [])
    c = doctor.check_cert()
    assert c.status == "ok" and "mini" in c.detail
    ident.key.chmod(0o644)
    c = doctor.check_cert()
    assert c.status == "fail" and c.fix == f"chmod 600 {ident.key}"
    ident.key.chmod(0o600)
    other, other_key = tls.make_ca("another cluster")
    ident.cert.write_bytes(tls.issue_cert(other, other_key, "mini")[0])
    c = doctor.check_cert()
    assert c.status == "fail" and "not signed by this cluster's CA" in c.detail
    ca, ca_key = ident.ca.read_bytes(), ident.ca_key.read_bytes()
    ident.cert.write_bytes(tls.issue_cert(ca, ca_key, "mini", days=10)[0])
    c = doctor.check_cert()
    assert c.status == "warn" and "expires on" in c.detail
    ident.cert.write_bytes(tls.issue_cert(ca, ca_key, "mini", days=0)[0])
    c = doctor.check_cert()
    assert c.status == "fail" and "expired on" in c.detail
    ident.ca_key.unlink()
    ident.cert.unlink()
    c = doctor.check_cert()
    assert c.status == "fail" and "init --node" in c.fix
