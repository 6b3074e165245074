"""Joining a cluster with a token (cluster/join.py, docs/SECURITY.md "Joining"):
real join servers on loopback, real TLS, real files in temp config homes."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import ssl
import stat
import threading
import time

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fakes
from fakes import HASH, FakeEngine
from mlxmoe.cluster import join, keys, tls
from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.limits import GuardedSite
from mlxmoe.cluster.node_server import start_node

pytestmark = pytest.mark.timeout(90)
FILES = {"cluster.key", "ca.pem", "cert.pem", "cert.key"}


class JoinLoop(fakes.LoopThread):
    """A join server for `home` on 127.0.0.1 (a free port), in a loop thread."""

    def __init__(self, home, **kw):
        super().__init__()
        self.home, self.kw = home, kw

    async def _start(self):
        self.running = await join.start_join(self.home, "127.0.0.1", 0, **self.kw)

    async def _stop(self):
        await self.running.stop()

    @property
    def server(self) -> join.JoinServer:
        return self.running.server

    @property
    def port(self) -> int:
        return self.running.port

    def token(self, **kw) -> join.JoinToken:
        return join.create_token(self.home, host="127.0.0.1", port=self.port, **kw)


def first_mac(d):
    """A first Mac's config home, as `mlxmoe init` leaves it."""
    keys.create_key(d / "cluster.key")
    tls.create_ca(d)
    tls.ensure_identity(d, "first", ["127.0.0.1"])
    return d


@pytest.fixture
def first(tmp_path):
    return first_mac(tmp_path / "first")


@pytest.fixture
def srv(first):
    with JoinLoop(first) as s:
        yield s


def written(home) -> set[str]:
    return {p.name for p in home.iterdir()} if home.exists() else set()


def private(p) -> bool:
    return not p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)


# ---------------------------------------------------------------- pure: tokens, homes, certificates
def test_token_text_round_trips_is_short_and_tokens_json_keeps_no_secret(first):
    tok = join.create_token(first, host="192.168.100.200", port=7419)
    text = str(tok)
    assert len(text) < 120 and text.startswith(f"mlxmoe-{tok.id}.{tok.secret}@192.168.100.200:7419#sha256:")
    assert join.parse_token(text) == tok and join.parse_token(f"  '{text}'\n") == tok
    assert join.ca_fingerprint((first / "ca.pem").read_bytes()).startswith(tok.fingerprint)
    assert len(str(join.create_token(first, host="mac-studio-of-someone.local"))) < 120
    v6 = join.JoinToken(tok.id, tok.secret, "fe80::1", 7419, tok.fingerprint)
    assert join.parse_token(str(v6)) == v6 and "@[fe80::1]:7419#" in str(v6)
    stored = (first / "tokens.json").read_text()
    assert tok.secret not in stored and json.loads(stored)["tokens"][tok.id]["verifier"] == \
        join.verifier(tok.id, tok.secret)
    assert private(first / "tokens.json")
    for bad in ("", "mlxmoe-abc", text.replace("mlxmoe-", "kube-"), text.split("#")[0], text.split("@")[0],
                text.replace(tok.secret, tok.secret[:-1]), text.replace(tok.secret, tok.secret.upper()),
                text[:-len(tok.fingerprint)] + tok.fingerprint[:31], text.replace(":7419", ":70000"),
                text.replace("192.168.100.200", "[nothex::zz]"), text + " extra"):
        with pytest.raises(join.MalformedToken, match="not a join token"):
            join.parse_token(bad)


def test_config_home_honours_mlxmoe_home(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.ENV_VAR, raising=False)
    monkeypatch.setenv("MLXMOE_HOME", str(tmp_path / "h"))
    assert keys.config_home() == tmp_path / "h" and keys.default_path() == tmp_path / "h" / "cluster.key"
    assert join.default_home() == tmp_path / "h"
    monkeypatch.setenv(keys.ENV_VAR, str(tmp_path / "k" / "cluster.key"))  # the key file's own override still wins
    assert keys.default_path() == tmp_path / "k" / "cluster.key"
    monkeypatch.delenv("MLXMOE_HOME")
    monkeypatch.delenv(keys.ENV_VAR)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert keys.config_home() == tmp_path / "xdg" / "mlxmoe"


def test_a_signed_csr_is_a_node_certificate_like_issue_cert():
    ca, ca_key = tls.make_ca()
    csr, key = tls.make_csr("mini", ["10.0.0.5", "mini.local", "mini"])
    signed = x509.load_pem_x509_certificate(tls.sign_csr(ca, ca_key, csr))
    issued = x509.load_pem_x509_certificate(tls.issue_cert(ca, ca_key, "mini", ["10.0.0.5", "mini.local"])[0])
    assert tls.cert_problem(signed.public_bytes(serialization.Encoding.PEM), ca) is None
    assert [e.oid for e in signed.extensions] == [e.oid for e in issued.extensions]
    for e in signed.extensions:
        assert e.value == issued.extensions.get_extension_for_oid(e.oid).value
    assert abs((signed.not_valid_after_utc - signed.not_valid_before_utc)
               - (issued.not_valid_after_utc - issued.not_valid_before_utc)) < dt.timedelta(seconds=5)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert signed.public_key().public_bytes(*spki) == \
        serialization.load_pem_private_key(key, None).public_key().public_bytes(*spki)


def _csr(name="mini", key=None, sans=None, two_cns=False) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)] * (2 if two_cns else 1)
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("csr, why", [
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
    (lambda: _csr(key=rsa.generate_private_key(65537, 2048)), "EC P-256"),
    (lambda: _csr(key=ec.generate_private_key(ec.SECP384R1())), "EC P-256"),
    (lambda: _csr(name="two words"), "one common name"),
    (lambda: _csr(name="x" * 64), "one common name"),
    (lambda: _csr(two_cns=True), "one common name"),
    (lambda: _csr(sans=[x509.DNSName(f"h{i}.local") for i in range(17)]), "at most 16"),
    (lambda: _csr(sans=[x509.RFC822Name("a@b.c")]), "DNS names or IP addresses"),
    (lambda: _csr(sans=[x509.DNSName("*.evil")]), "DNS names or IP addresses"),
])
def test_sign_csr_refuses_unfit_requests(csr, why):
    ca, ca_key = tls.make_ca()
    with pytest.raises(ValueError, match=why):
        tls.sign_csr(ca, ca_key, csr())


def test_the_answer_is_sealed_for_the_csrs_key_and_this_request_only(first):
    tok = join.create_token(first, host="127.0.0.1")
    server = join.JoinServer(first)
    nonce = server._new_nonce("127.0.0.1")
    csr, key_pem = tls.make_csr("mini", ["10.0.0.5"])
    body = {"v": 1, "id": tok.id, "nonce": nonce, "csr": csr.decode(), "proof": join.prove(tok, nonce, csr, server.fp)}
    answer = server._grant(join.parse_join_body(json.dumps(body).encode()), "127.0.0.1")
    assert server.cluster_key.hex() not in json.dumps(answer) and "BEGIN CERTIFICATE" not in json.dumps(answer)
    key = serialization.load_pem_private_key(key_pem, None)
    ctx = join._context("answer", tok.id, nonce, csr, server.fp)
    assert json.loads(join.open_sealed(key, ctx, answer))["cluster_key"] == server.cluster_key.hex()
    with pytest.raises(join.BadAnswer, match="not sealed for this request"):
        join.open_sealed(key, join._context("answer", tok.id, "A" * 22, csr, server.fp), answer)
    with pytest.raises(join.BadAnswer):
        join.open_sealed(ec.generate_private_key(ec.SECP256R1()), ctx, answer)
    flipped = dict(answer, sealed=answer["sealed"][:-2] + ("A" if answer["sealed"][-2] != "A" else "B") + "A")
    with pytest.raises(join.BadAnswer):
        join.open_sealed(key, ctx, flipped)
    with pytest.raises(join.BadProof):  # the proof is bound to the CSR it was made for
        other, _ = tls.make_csr("mallory")
        server._grant(join.parse_join_body(json.dumps(body | {"csr": other.decode()}).encode()), "127.0.0.1")


# ---------------------------------------------------------------- joining
def _signed_info(url: str, key: bytes, ident: tls.Identity) -> dict:
    async def call():
        ctx = tls.client_context(ident)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http_:
            return await NodeClient(http_, url, key, HASH).call("info")
    loop = fakes.LoopThread()
    loop.thread.start()
    try:
        return loop.run(call(), timeout=20)
    finally:
        loop.loop.call_soon_threadsafe(loop.loop.stop)
        loop.thread.join(5)


def test_a_token_joins_and_the_new_member_passes_mutual_tls(srv, first, tmp_path):
    tok = srv.token()
    mini = tmp_path / "mini"
    ident = join.join(str(tok), mini, name="mini", hosts=["10.0.0.5", "mini.local"])
    assert written(mini) == FILES  # exactly these four: no ca.key, no temp file
    assert private(mini / "cluster.key") and private(mini / "cert.key") and private(mini)
    assert (mini / "ca.pem").read_bytes() == (first / "ca.pem").read_bytes()
    assert keys.load_key(mini / "cluster.key") == keys.load_key(first / "cluster.key")
    assert ident.problem() is None and tls.cert_name(ident.cert.read_bytes()) == "mini"
    sans = x509.load_pem_x509_certificate(ident.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "10.0.0.5" in [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    rec = join.TokenStore(first).get(tok.id)
    assert rec["used"] == 1 and rec["joined"][0]["name"] == "mini"
    assert srv.server.stats["granted"] == 1

    key = keys.load_key(mini / "cluster.key")
    # the new member calls a node that runs with the first Mac's identity: mutual TLS + signed RPC
    n = srv.run(start_node(FakeEngine(group=0), key, "127.0.0.1", 0, advertise=False, name="first",
                           tls=tls.Identity.in_dir(first)))
    try:
        assert _signed_info(n.url, key, ident)["group"] == 0
    finally:
        srv.run(n.stop())
    # and a node run with the new member's identity takes the first Mac's calls
    n = srv.run(start_node(FakeEngine(group=1), key, "127.0.0.1", 0, advertise=False, name="mini", tls=ident))
    try:
        assert _signed_info(n.url, key, tls.Identity.in_dir(first))["group"] == 1
    finally:
        srv.run(n.stop())


def test_the_same_token_twice_is_refused_and_nothing_is_written(srv, tmp_path):
    tok = srv.token()
    join.join(tok, tmp_path / "a")
    with pytest.raises(join.TokenUsed, match="already used"):
        join.join(tok, tmp_path / "b")
    assert written(tmp_path / "b") == set()
    assert srv.server.stats["already_used"] == 1


def test_a_token_for_two_macs_joins_two_and_racing_joins_share_no_use(srv, tmp_path):
    tok = srv.token(uses=2)
    join.join(tok, tmp_path / "a")
    join.join(tok, tmp_path / "b")
    with pytest.raises(join.TokenUsed):
        join.join(tok, tmp_path / "c")
    one = srv.token()
    results = {}

    def attempt(i):
        try:
            join.join(one, tmp_path / f"r{i}")
            results[i] = "ok"
        except join.JoinError as e:
            results[i] = e.code
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results.values()) == ["already_used"] * 3 + ["ok"], results
    assert sum(written(tmp_path / f"r{i}") == FILES for i in range(4)) == 1
    assert sum(written(tmp_path / f"r{i}") == set() for i in range(4)) == 3


def test_an_expired_token_is_refused(first, tmp_path):
    now = [time.time()]
    with JoinLoop(first, clock=lambda: now[0]) as s:
        clock = lambda: now[0]  # noqa: E731
        with pytest.raises(join.TokenExpired, match="expired at"):
            join.join(s.token(ttl=0, clock=clock), tmp_path / "a")
        tok = s.token(clock=clock)  # one hour
        now[0] += 3601
        with pytest.raises(join.TokenExpired, match=f"token {tok.id} expired"):
            join.join(tok, tmp_path / "a")
        assert written(tmp_path / "a") == set()
        now[0] -= 3601 - 60  # still in time
        join.join(tok, tmp_path / "a")


def test_a_wrong_secret_is_refused_and_rate_limited(srv, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlxmoe.join")
    tok = srv.token()
    bad = join.JoinToken(tok.id, "0" * 16 if tok.secret != "0" * 16 else "1" * 16, tok.host, tok.port,
                         tok.fingerprint)
    unknown = join.JoinToken("zzzzzz" if tok.id != "zzzzzz" else "yyyyyy", tok.secret, tok.host, tok.port,
                             tok.fingerprint)
    with pytest.raises(join.UnknownToken, match="unknown token"):
        join.join(unknown, tmp_path / "a")
    for _ in range(join.FAILURES_PER_MINUTE - 1):
        with pytest.raises(join.BadProof, match="wrong secret"):
            join.join(bad, tmp_path / "a")
    for t in (bad, bad, tok, tok):  # now even the right secret waits: brute force gets 10 tries a minute
        with pytest.raises(join.TooManyFailures, match="too many failed join attempts"):
            join.join(t, tmp_path / "a")
    assert written(tmp_path / "a") == set()
    assert join.TokenStore(srv.home).get(tok.id)["used"] == 0  # the token is still good
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxmoe.join"]
    assert sum("wrong secret" in m for m in lines) == join.FAILURES_PER_MINUTE - 1
    assert sum("unknown token" in m for m in lines) == 1
    assert sum("too many failed" in m for m in lines) == 1  # logged once, not per try
    srv.server.failures.clear()  # a minute later
    join.join(tok, tmp_path / "a")


def test_parallel_guesses_get_no_more_tries(first, tmp_path):
    with JoinLoop(first, failures_per_minute=3) as s:
        tok = s.token()
        bad = join.JoinToken(tok.id, "0" * 16 if tok.secret != "0" * 16 else "1" * 16, tok.host, tok.port,
                             tok.fingerprint)
        got = []

        def guess(i):
            try:
                join.join(bad, tmp_path / f"g{i}")
            except join.JoinError as e:
                got.append(e.code)
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(got) == ["bad_proof"] * 3 + ["rate_limited"] * 4, got


def test_a_token_of_another_cluster_is_refused_before_the_csr_is_sent(srv, first, tmp_path):
    tok = srv.token()
    other_ca, _ = tls.make_ca("another cluster")
    wrong = join.JoinToken(tok.id, tok.secret, tok.host, tok.port, join.ca_fingerprint(other_ca)[:join.FP_HEX])
    with pytest.raises(join.CaMismatch) as e:
        join.join(wrong, tmp_path / "a")
    assert "the cluster's CA does not match the token: another cluster, or someone in between" in str(e.value)
    assert srv.server.stats["hello"] == 1 and srv.server.stats["join"] == 0  # no /join request
    assert written(tmp_path / "a") == set()
    assert join.TokenStore(first).get(tok.id)["used"] == 0


def test_someone_in_between_who_shows_the_real_ca_gets_no_request(first, tmp_path):
    """An impostor relays the cluster's (public) CA certificate in its hello but
    cannot present a certificate that CA signed: the second TLS handshake fails."""
    imp = tmp_path / "impostor"
    imp.mkdir()
    (imp / "ca.pem").write_bytes((first / "ca.pem").read_bytes())
    mallory = tmp_path / "mallory"
    tls.create_ca(mallory)
    (imp / "ca.key").write_bytes((mallory / "ca.key").read_bytes())
    keys.create_key(imp / "cluster.key")
    ident = tls.ensure_identity(mallory, "first", ["127.0.0.1"])  # signed by mallory's CA

    class Impostor(fakes.LoopThread):
        async def _start(self):
            self.app = join.join_app(imp)
            self.runner = aiohttp.web.AppRunner(self.app, access_log=None)
            await self.runner.setup()
            self.site = GuardedSite(self.runner, "127.0.0.1", 0, ssl_context=join.server_context(ident))
            await self.site.start()

        async def _stop(self):
            await self.runner.cleanup()

    with Impostor() as m:
        tok = join.create_token(first, host="127.0.0.1", port=m.site.port)
        with pytest.raises(join.CaMismatch, match="someone in between"):
            join.join(tok, tmp_path / "a")
        assert m.app[join.JOIN_SERVER].stats["hello"] == 1 and m.app[join.JOIN_SERVER].stats["join"] == 0
    assert written(tmp_path / "a") == set()


def test_unreachable_already_a_member_and_force(srv, first, tmp_path):
    tok = srv.token()
    closed = join.JoinToken(tok.id, tok.secret, "127.0.0.1", 1, tok.fingerprint)
    with pytest.raises(join.JoinUnreachable, match="cannot reach the first Mac at 127.0.0.1:1"):
        join.join(closed, tmp_path / "a", timeout=5)
    old = first_mac(tmp_path / "old")  # a Mac of another cluster, with that cluster's ca.key
    with pytest.raises(join.AlreadyMember, match="already belongs to a cluster"):
        join.join(tok, old)
    assert join.TokenStore(first).get(tok.id)["used"] == 0  # refused before the server was asked
    join.join(tok, old, force=True)
    assert not (old / "ca.key").exists()  # the old CA's key would sign for the wrong CA
    assert (old / "ca.pem").read_bytes() == (first / "ca.pem").read_bytes()
    assert tls.Identity.in_dir(old).problem() is None


def test_nothing_of_the_first_mac_but_its_ca_certificate_is_served(srv, first):
    ctx = join._unverified_context()
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=5)
    conn.request("GET", "/join/hello")
    hello = json.loads(conn.getresponse().read())
    assert set(hello) == {"v", "ca", "name", "nonce"}
    blob = json.dumps(hello)
    for f in ("ca.key", "cluster.key", "cert.key"):
        assert (first / f).read_text().strip().splitlines()[1 if f != "cluster.key" else 0] not in blob


# ---------------------------------------------------------------- hostile join bodies
def _post(port: int, body: bytes, headers: dict | None = None) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=join._unverified_context(), timeout=10)
    try:
        conn.putrequest("POST", "/join")
        hs = {"Content-Length": str(len(body)), "Content-Type": "application/json", **(headers or {})}
        for k, v in hs.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        return conn.getresponse().status
    finally:
        conn.close()


def _nonce(port: int) -> str:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=join._unverified_context(), timeout=10)
    try:
        conn.request("GET", "/join/hello")
        return json.loads(conn.getresponse().read())["nonce"]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    home = first_mac(tmp_path_factory.mktemp("hostile"))
    with JoinLoop(home, failures_per_minute=10 ** 9) as s:
        tok = s.token(uses=10 ** 9)
        s.fp = join.ca_fingerprint((home / "ca.pem").read_bytes())
        s.tok = tok
        yield s


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
field = st.one_of(json_values, st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=0, max_size=90))


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["bytes", "json", "fields", "shaped", "deep", "proved"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600)), None
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), None
    if kind == "deep":
        n = draw(st.integers(1, 8000))
        return b"[" * n + b"]" * draw(st.integers(0, n)), None
    if kind == "fields":
        keys_ = draw(st.sets(st.sampled_from(["v", "id", "nonce", "csr", "proof", "x"]), min_size=4))
        return json.dumps({k: draw(field) for k in keys_}).encode(), None
    if kind == "shaped":  # every field well-formed, most of them wrong: the token, nonce and proof checks
        alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
        b64 = alnum + "ABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
        doc = {"v": draw(st.sampled_from([1, 1.0, 2, True, "1"])),
               "id": draw(st.sampled_from(["TOKEN"]) | st.text(alnum, min_size=6, max_size=6)),
               "nonce": draw(st.sampled_from(["NONCE"]) | st.text(b64, min_size=22, max_size=22)),
               "csr": draw(st.sampled_from(["CSR"]) | st.text(max_size=100)),
               "proof": draw(st.text(b64, min_size=86, max_size=86))}
        return None, doc
    # a well-formed request from the token's holder, with a hostile CSR: it gets past the proof
    csr = draw(st.one_of(st.text(max_size=300).filter(str.isascii),
                         st.just(_csr(name="bad name").decode()), st.just(_csr().decode()[:-60] + "\n-----END CERTIFICATE REQUEST-----\n")))
    return None, csr


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(bodies())
def test_hostile_join_bodies_get_a_4xx_never_a_5xx(hostile, case):
    data, csr = case
    if isinstance(csr, dict):
        doc = dict(csr)
        if doc["id"] == "TOKEN":
            doc["id"] = hostile.tok.id
        if doc["nonce"] == "NONCE":
            doc["nonce"] = _nonce(hostile.port)
        if doc["csr"] == "CSR":
            doc["csr"] = _csr().decode()
        data = json.dumps(doc).encode()
    elif data is None:
        nonce = _nonce(hostile.port)
        csr = csr or "x"
        body = {"v": 1, "id": hostile.tok.id, "nonce": nonce, "csr": csr,
                "proof": join.prove(hostile.tok, nonce, csr.encode(), hostile.fp)}
        data = json.dumps(body).encode()
    status = _post(hostile.port, data)
    assert 400 <= status < 500, (status, data[:200])


def test_sizes_and_framing_are_bounded(hostile):
    assert _post(hostile.port, b"{}") == 400
    try:
        status = _post(hostile.port, b"x" * (join.MAX_BODY + 1))
    except (ConnectionError, http.client.HTTPException, ssl.SSLError):
        status = 413  # refused unread: the client may see the reset instead (docs/SECURITY.md, Known gaps)
    assert status == 413
    conn = http.client.HTTPSConnection("127.0.0.1", hostile.port, context=join._unverified_context(), timeout=10)
    conn.putrequest("POST", "/join")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"2\r\n{}\r\n0\r\n\r\n")
    assert conn.getresponse().status == 400
    conn.close()
    # a body sent in pieces is read whole; a nonce never issued is stale
    nonce = _nonce(hostile.port)
    body = json.dumps({"v": 1, "id": hostile.tok.id, "nonce": nonce, "csr": "junk",
                       "proof": join.prove(hostile.tok, nonce, b"junk", hostile.fp)}).encode()
    conn = http.client.HTTPSConnection("127.0.0.1", hostile.port, context=join._unverified_context(), timeout=10)
    conn.putrequest("POST", "/join")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[:40])
    time.sleep(0.3)
    conn.send(body[40:])
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["message"].startswith("csr: not a PEM")
    conn.close()
    stale = json.loads(body) | {"nonce": "A" * 22}
    assert _post(hostile.port, json.dumps(stale).encode()) == 400
    assert hostile.server.stats["stale_nonce"] >= 1 and hostile.server.stats["granted"] == 0


# ---------------------------------------------------------------- the command
def test_mlxmoe_token_prints_a_token_and_the_hint_and_a_hidden_join_uses_it(first, tmp_path, monkeypatch):
    from mlxmoe.cli import main
    monkeypatch.delenv(keys.ENV_VAR, raising=False)
    monkeypatch.setenv("MLXMOE_HOME", str(first))
    with JoinLoop(first) as s:
        r = CliRunner().invoke(main, ["token", "--ttl", "30m", "--host", "127.0.0.1", "--port", str(s.port)])
        assert r.exit_code == 0, r.output
        text, hint = r.stdout.splitlines()[:2]
        tok = join.parse_token(text)
        assert hint == f"on the other Mac: mlxmoe up --join '{text}'"
        rec = join.TokenStore(first).get(tok.id)
        assert rec["uses"] == 1 and 1790 < rec["expires"] - time.time() <= 1800
        monkeypatch.setenv("MLXMOE_HOME", str(tmp_path / "mini"))
        r = CliRunner().invoke(main, ["token", "--join", text, "--name", "mini"])
        assert r.exit_code == 0, r.output
        assert written(tmp_path / "mini") == FILES
        r = CliRunner().invoke(main, ["token", "--join", text, "--force"])
        assert r.exit_code == 1 and r.output.endswith("(--uses N for several Macs)\n")
        assert r.output.strip().splitlines()[-1].startswith("Error: the first Mac refused: token")
    for bad in ("0", "-1h", "soon"):
        r = CliRunner().invoke(main, ["token", "--ttl", bad, "--host", "127.0.0.1"])
        assert r.exit_code == 2 and "--ttl" in r.output
    monkeypatch.setenv("MLXMOE_HOME", str(tmp_path / "empty"))
    r = CliRunner().invoke(main, ["token", "--host", "127.0.0.1"])
    assert r.exit_code == 1 and "no cluster CA with its key" in r.output
    assert "token" in CliRunner().invoke(main, ["--help"]).output
