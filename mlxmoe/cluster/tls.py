"""The cluster CA and this Mac's certificate: mutual TLS between router and
nodes and between nodes (docs/SECURITY.md, "Transport").

Files live beside the cluster key (the config home: $MLXMOE_HOME, else
~/.config/mlxmoe/; keys.config_home()):
  ca.pem    the cluster CA certificate (public; every Mac has it)
  ca.key    the CA's private key (mode 0600; travels with cluster.key, so a
            node issues its own certificate at first start, or stays on the
            first Mac, which signs the others' CSRs: cluster/join.py)
  cert.pem, cert.key   this Mac's certificate and key, signed by the CA

Every connection verifies the peer's certificate against the cluster CA only
(no system roots) and presents this Mac's certificate; a peer without a
CA-signed certificate fails the handshake before any HTTP. Host names are not
checked: nodes are addressed by LAN IPs that DHCP changes, and every holder of
a CA-signed certificate is an equal cluster member (it also holds the cluster
key), so membership, not a name, is what the CA proves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mlxmoe.errors import MlxMoeError

CA_DAYS = 3650
CERT_DAYS = 825
CA_CERT, CA_KEY, CERT, KEY = "ca.pem", "ca.key", "cert.pem", "cert.key"


class TlsError(MlxMoeError):
    """A CA or certificate file is missing, unreadable or wrong (message says how to fix)."""

    status, code = 500, "tls"  # this Mac's own files: no request of a client is at fault


# ---------------------------------------------------------------- pure: make and check
def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # P-256: every ssl build accepts it


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(name: str = "mlxmoe cluster CA", days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """(CA certificate PEM, CA key PEM)."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names, seen = [], set()
    for h in hosts:
        if not h or h in seen or h in ("0.0.0.0", "::"):
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def issue_cert(ca_cert_pem: bytes, ca_key_pem: bytes, name: str, hosts: list[str] = (),
               days: int = CERT_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for one Mac, signed by the CA; usable as
    server and as client (a node is both)."""
    key = _new_key()
    return _sign(ca_cert_pem, ca_key_pem, key.public_key(), name, list(hosts), days), _key_pem(key)


def _sign(ca_cert_pem: bytes, ca_key_pem: bytes, public_key, name: str, hosts: list[str], days: int) -> bytes:
    """The one node-certificate builder (issue_cert and sign_csr): same extensions, same validity."""
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(min(_now() + dt.timedelta(days=days), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(_san([name, *hosts]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


CSR_MAX_HOSTS = 16
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def make_csr(name: str, hosts: list[str] = ()) -> tuple[bytes, bytes]:
    """(CSR PEM, key PEM): a certificate signing request for this Mac (what
    `sign_csr` on the CA's Mac turns into a node certificate); the key never
    leaves this Mac."""
    key = _new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
    names = [h for h in dict.fromkeys(hosts) if h and h != name and h not in ("0.0.0.0", "::")][:CSR_MAX_HOSTS]
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _key_pem(key)


def csr_request(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, str, list[str]]:
    """(CSR, name, hosts) of a CSR fit to sign, or ValueError naming what is wrong:
    a valid self-signature, an EC P-256 key, a plain name (1-63 of [A-Za-z0-9._-]),
    at most CSR_MAX_HOSTS DNS names or IP addresses. Its other extensions are ignored."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError):
        raise ValueError("not a PEM certificate signing request") from None
    try:
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature is not valid")
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"the CSR's signature or key cannot be read ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the CSR's key must be EC P-256")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if len(cns) == 1 else ""
    if not 1 <= len(name) <= 63 or not set(name) <= _NAME_CHARS:
        raise ValueError("the CSR must name one Mac: one common name of 1-63 letters, digits, '.', '-' or '_'")
    hosts: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = []
    except ValueError as e:
        raise ValueError(f"the CSR's extensions cannot be read ({e})") from None
    for gn in san:
        if isinstance(gn, x509.IPAddress) and not isinstance(gn.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            hosts.append(str(gn.value))
        elif isinstance(gn, x509.DNSName) and 1 <= len(gn.value) <= 253 and set(gn.value) <= _NAME_CHARS:
            hosts.append(gn.value)
        else:
            raise ValueError("the CSR's alternative names must be DNS names or IP addresses")
    if len(hosts) > CSR_MAX_HOSTS:
        raise ValueError(f"the CSR names {len(hosts)} hosts (at most {CSR_MAX_HOSTS})")
    return csr, name, hosts


def sign_csr(ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, days: int = CERT_DAYS) -> bytes:
    """A node certificate (PEM) for the CSR's key, name and hosts, signed by the
    CA exactly as issue_cert signs (ValueError if the CSR is unfit: csr_request)."""
    csr, name, hosts = csr_request(csr_pem)
    return _sign(ca_cert_pem, ca_key_pem, csr.public_key(), name, hosts, days)


def cert_problem(cert_pem: bytes, ca_cert_pem: bytes, now: dt.datetime | None = None) -> str | None:
    """Why this certificate would be refused by the cluster (None: it would not)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as e:
        return f"not a PEM certificate ({e})"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by this cluster's CA"
    now = now or _now()
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    if now >= cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def _pair(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError:
        return False
    pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(*pub) == key.public_key().public_bytes(*pub)


def cert_name(cert_pem: bytes) -> str:
    attrs = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else "?"


def default_hosts(bind: str | None = None) -> list[str]:
    """What a certificate names besides the Mac's name (informational: see the
    module doc on host names)."""
    host = socket.gethostname()
    return [h for h in (host, host.split(".")[0] + ".local", "localhost", "127.0.0.1", bind) if h]


# ---------------------------------------------------------------- files
def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically (a process starting meanwhile reads the old or the new file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    write_private(path, data, 0o644)


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Identity:
    """Paths of the cluster CA certificate and of this Mac's certificate and key."""
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, d: str | Path) -> "Identity":
        d = Path(d).expanduser()
        return cls(d / CA_CERT, d / CERT, d / KEY)

    @property
    def ca_key(self) -> Path:
        return self.ca.with_name(CA_KEY)

    def problem(self) -> str | None:
        for p in (self.ca, self.cert, self.key):
            if not p.exists():
                return f"{p} is missing"
        bad = cert_problem(self.cert.read_bytes(), self.ca.read_bytes())
        if bad is None and not _pair(self.cert.read_bytes(), self.key.read_bytes()):
            bad = f"{self.key} is not the key of {self.cert}"
        return bad


def create_ca(d: str | Path, force: bool = False) -> Identity:
    ident = Identity.in_dir(d)
    if ident.ca.exists() and not force:
        raise FileExistsError(f"{ident.ca} already exists; keeping it (use --force to replace it)")
    cert, key = make_ca()
    write_private(ident.ca_key, key)
    write_public(ident.ca, cert)
    for stale in (ident.cert, ident.key):  # signed by the old CA
        stale.unlink(missing_ok=True)
    return ident


def issue_into(ident: Identity, name: str, hosts: list[str]) -> Identity:
    """Sign a certificate for `name` with the CA key beside ident.ca."""
    if not ident.ca_key.exists():
        raise TlsError(f"no CA key at {ident.ca_key}: issue this Mac's certificate on the Mac that has it "
                       f"(`mlxmoe init --node {name} --out DIR`) and copy cert.pem and cert.key here, "
                       f"or copy ca.key here too")
    cert, key = issue_cert(ident.ca.read_bytes(), ident.ca_key.read_bytes(), name, hosts)
    write_private(ident.key, key)
    write_public(ident.cert, cert)
    return ident


def ensure_identity(d: str | Path, name: str, hosts: list[str]) -> Identity:
    """This Mac's identity in `d`, issuing (or renewing) its certificate at
    first start when the CA key is there."""
    ident = Identity.in_dir(d)
    if not ident.ca.exists():
        raise TlsError(f"no cluster CA at {ident.ca}: run `mlxmoe init` on your first Mac and copy ca.pem "
                       f"(and ca.key) beside cluster.key on the others (or pass --insecure-plain-http, for tests)")
    if ident.problem() is not None:
        with _lock(ident.cert.with_name(".issue.lock")):  # a node and the router may start at once
            if ident.problem() is not None:
                issue_into(ident, name, hosts)
    bad = ident.problem()
    if bad:
        raise TlsError(f"this Mac's certificate {ident.cert}: {bad}")
    return ident


# ---------------------------------------------------------------- ssl contexts
def _context(purpose: ssl.Purpose, ident: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # both ends are ours
    ctx.load_verify_locations(cadata=ident.ca.read_text())  # the cluster CA only: no system roots
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(ident: Identity) -> ssl.SSLContext:
    """For a node's server: a client without a CA-signed certificate fails the handshake."""
    ctx = _context(ssl.Purpose.CLIENT_AUTH, ident)
    # No TLS 1.3 session tickets: they would make a PeerLink's socket readable
    # before the answer, and its select() must mean "the answer is here".
    ctx.num_tickets = 0
    return ctx


def client_context(ident: Identity) -> ssl.SSLContext:
    """For the router and for node-to-node calls: present our certificate,
    accept only a server the cluster CA signed (no host name check: module doc)."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, ident)
    ctx.check_hostname = False
    return ctx

