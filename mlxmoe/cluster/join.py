"""Joining a cluster with a one-time token instead of copying secrets by hand
(docs/SECURITY.md, "Joining"), as `kubeadm join` does.

On the first Mac (the one with ca.key and cluster.key in its config home):

    create_token(home)  -> JoinToken, printed by `mlxmoe token`:
        mlxmoe-<id>.<secret>@<host>:<port>#sha256:<CA fingerprint>
    start_join(home) / serve_join(home)  the join server: HTTPS without client
        certificates, on JOIN_PORT, with this Mac's own CA-signed certificate

On the Mac that joins:

    join(token, home)   writes cluster.key, ca.pem, cert.pem, cert.key there

The protocol (version 1):

1. The joiner opens TLS to host:port *without* verifying the server, sends
   `GET /join/hello` and gets the cluster CA certificate and a fresh nonce.
   It checks sha256(CA DER) against the token's fingerprint and stops there
   if they differ (CaMismatch): nothing secret has been sent.
2. It makes a key pair and a CSR (EC P-256) for its name and addresses and
   opens a second TLS connection that trusts only that CA (a server without a
   certificate the CA signed fails the handshake), then sends `POST /join`
   with the token id, the nonce, the CSR and a proof: an Ed25519 signature
   over (token id, nonce, sha256(CSR), CA fingerprint) by a key derived from
   the token's secret (HKDF). The secret itself never travels.
3. The first Mac stores per token only the proof key's public half (a one-way
   function of the secret: reading tokens.json does not let anyone join),
   the expiry and the number of uses left. It verifies the proof, checks
   the token is unexpired and not used up, counts the use (atomically, under
   a file lock), signs the CSR with the CA key (tls.sign_csr: the same
   certificate `mlxmoe init` issues) and answers with the certificate, the
   CA certificate and the cluster key, sealed (ECDH to the CSR's public key,
   HKDF, AES-GCM, bound to token id, nonce, CSR and CA fingerprint): only
   the holder of the CSR's private key can read or alter it, whoever
   terminated the TLS. ca.key never leaves the first Mac.
4. The joiner opens the answer, checks the certificate is its own key's and
   the CA's, and only then writes its four files. Any refusal writes nothing.

Refusals are one-line errors (JoinError subclasses) and a 4xx naming the
reason; failed proofs (and unknown token ids) are rate limited per address.
Finding the first Mac by Bonjour when the token names no address is not done:
a token always carries host:port.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mlxmoe.errors import MlxMoeError
from mlxmoe.cluster import keys, tls
from mlxmoe.cluster.limits import GuardedSite, Limits

log = logging.getLogger("mlxmoe.join")

PROTO = "mlxmoe-join-v1"
JOIN_PORT = 7419
TOKEN_TTL_S = 3600.0
TOKENS_FILE = "tokens.json"
FP_HEX = 32  # a token carries 128 bits of sha256(CA DER): finding another CA with that prefix is out of reach
KEEP_EXPIRED_S = 86400.0  # an expired token stays in tokens.json a day, so a late try hears "expired"
MAX_BODY = 16 * 1024  # a join request (a CSR is ~0.5 KB)
MAX_ANSWER = 64 * 1024
BODY_TIMEOUT_S = 10.0
NONCE_TTL_S = 120.0
MAX_NONCES, NONCES_PER_ADDRESS = 256, 16
FAILURES_PER_MINUTE = 10  # failed proofs (and unknown token ids) per address
MAX_ADDRESSES = 4096  # addresses the rate limiter remembers
LOG_PER_MINUTE = 30  # refusal lines per address and minute
HTTP_LIMITS = {"max_line_size": 4096, "max_field_size": 4096, "max_headers": 32, "lingering_time": 0}
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_TOKEN_RE = re.compile(r"mlxmoe-(?P<id>[a-z0-9]{6})\.(?P<secret>[a-z0-9]{16})"
                       r"@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]{0,252})(?::(?P<port>[0-9]{1,5}))?"
                       r"#sha256:(?P<fp>[0-9a-f]{%d,64})" % FP_HEX)
_ID_RE = re.compile(r"[a-z0-9]{6}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22}")
_PROOF_RE = re.compile(r"[A-Za-z0-9_-]{86}")


# ---------------------------------------------------------------- errors
class JoinError(MlxMoeError):
    """Joining was refused or failed; the message says why and what to do."""

    status, code = 400, "join_refused"


class MalformedToken(JoinError):
    code = "malformed_token"


class MalformedJoin(JoinError):
    """The join request itself is malformed (server side)."""

    code = "malformed"


class StaleNonce(JoinError):
    code = "stale_nonce"


class UnknownToken(JoinError):
    status, code = 403, "unknown_token"


class BadProof(JoinError):
    status, code = 403, "bad_proof"


class TokenExpired(JoinError):
    status, code = 410, "expired"


class TokenUsed(JoinError):
    status, code = 410, "already_used"


class TooLarge(JoinError):
    status, code = 413, "too_large"


class TooManyFailures(JoinError):
    status, code = 429, "rate_limited"
    retry_after: float = 60.0


class CaMismatch(JoinError):
    """The server's CA is not the token's (client side, before anything secret is sent)."""

    code = "ca_mismatch"


class JoinUnreachable(JoinError):
    status, code = 503, "unreachable"


class BadAnswer(JoinError):
    """The server's answer cannot be opened or does not hold together (client side)."""

    status, code = 502, "bad_answer"


class AlreadyMember(JoinError):
    """This Mac's config home already holds a cluster's files (client side)."""

    status, code = 409, "already_member"


class TokenStoreError(JoinError):
    status, code = 500, "token_store"


_BY_CODE = {c.code: c for c in (MalformedToken, MalformedJoin, StaleNonce, UnknownToken, BadProof, TokenExpired,
                                 TokenUsed, TooLarge, TooManyFailures)}


# ---------------------------------------------------------------- tokens
@dataclass(frozen=True)
class JoinToken:
    """What `mlxmoe token` prints: token id, secret, where to join, and the
    first 128 bits (or more) of the sha256 of the cluster CA's DER."""

    id: str
    secret: str
    host: str
    port: int
    fingerprint: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mlxmoe-{self.id}.{self.secret}@{host}:{self.port}#sha256:{self.fingerprint}"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_token(text: str) -> JoinToken:
    """A JoinToken, or MalformedToken. Surrounding blanks and quotes are ignored."""
    t = str(text).strip().strip("'\"").strip()
    m = _TOKEN_RE.fullmatch(t)
    port = int(m["port"]) if m and m["port"] else JOIN_PORT
    if m is None or not 0 < port < 65536:
        shown = t if len(t) <= 40 else t[:20] + "..."
        raise MalformedToken(f"not a join token: {shown!r}; expected mlxmoe-<id>.<secret>@<host>:<port>"
                             f"#sha256:<fingerprint>, whole, as `mlxmoe token` printed it on the first Mac")
    host = m["host"].strip("[]")
    if m["host"].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MalformedToken(f"not a join token: {host!r} is not an IPv6 address") from None
    return JoinToken(m["id"], m["secret"], host, port, m["fp"])


def ca_fingerprint(ca_pem: bytes) -> str:
    """sha256 of the certificate's DER, as hex (a token carries its first FP_HEX digits)."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _proof_key(token_id: str, secret: str) -> Ed25519PrivateKey:
    seed = HKDF(hashes.SHA256(), 32, salt=f"{PROTO} token {token_id}".encode(),
                info=b"proof key").derive(secret.encode())
    return Ed25519PrivateKey.from_private_bytes(seed)


def verifier(token_id: str, secret: str) -> str:
    """What tokens.json keeps of a secret: the public half of its proof key (hex)."""
    return _proof_key(token_id, secret).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _context(kind: str, token_id: str, nonce: str, csr_pem: bytes, ca_fp: str) -> bytes:
    return json.dumps([PROTO, kind, token_id, nonce, hashlib.sha256(csr_pem).hexdigest(), ca_fp]).encode()


def prove(token: JoinToken, nonce: str, csr_pem: bytes, ca_fp: str) -> str:
    """The proof of possession of the token's secret for this nonce, CSR and CA (base64url)."""
    sig = _proof_key(token.id, token.secret).sign(_context("proof", token.id, nonce, csr_pem, ca_fp))
    return _b64(sig)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def default_home() -> Path:
    """The config home: where cluster.key lives ($MLXMOE_HOME, else ~/.config/mlxmoe)."""
    return keys.default_path().parent


def default_address() -> str:
    """This Mac's address on its LAN (the interface of the default route; no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
            if ip and not ip.startswith("0."):
                return ip
    except OSError:
        pass
    from mlxmoe.cluster.discovery import local_ipv4s
    return local_ipv4s()[0]


def default_name() -> str:
    """This Mac's short host name, as a certificate's common name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63].strip("-.")
    return name or "mac"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class TokenStore:
    """tokens.json in the config home (mode 0600): per token id its verifier,
    creation and expiry times (Unix seconds), uses allowed and used, and who
    joined with it. Every change is made under a file lock, re-reading the
    file, and written atomically, so two joins never share one use."""

    def __init__(self, home: str | Path):
        self.path = Path(home) / TOKENS_FILE
        self.lock = Path(home) / ".tokens.lock"

    def _load(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": 1, "tokens": {}}
        except (OSError, ValueError) as e:
            raise TokenStoreError(f"cannot read {self.path} ({e}); remove it to forget every token") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), dict):
            raise TokenStoreError(f"{self.path} is not a token list; remove it to forget every token")
        return doc

    def _save(self, doc: dict, now: float) -> None:
        doc["tokens"] = {k: v for k, v in doc["tokens"].items()
                         if isinstance(v, dict) and v.get("expires", 0) + KEEP_EXPIRED_S > now}
        tls.write_private(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def tokens(self) -> dict[str, dict]:
        return self._load()["tokens"]

    def get(self, token_id: str) -> dict | None:
        rec = self._load()["tokens"].get(token_id)
        return rec if isinstance(rec, dict) else None

    def add(self, token_id: str, verifier_hex: str, expires: float, uses: int, now: float) -> None:
        with _locked(self.lock):
            doc = self._load()
            if token_id in doc["tokens"]:
                raise TokenStoreError(f"token id {token_id} exists already")
            doc["tokens"][token_id] = {"verifier": verifier_hex, "created": now, "expires": expires,
                                       "uses": uses, "used": 0, "joined": []}
            self._save(doc, now)

    def revoke(self, token_id: str, now: float | None = None) -> bool:
        with _locked(self.lock):
            doc = self._load()
            gone = doc["tokens"].pop(token_id, None) is not None
            self._save(doc, time.time() if now is None else now)
            return gone

    def consume(self, token_id: str, now: float, who: dict) -> dict:
        """Count one use of the token, or raise UnknownToken / TokenExpired / TokenUsed."""
        with _locked(self.lock):
            doc = self._load()
            rec = doc["tokens"].get(token_id)
            if not isinstance(rec, dict):
                raise UnknownToken(f"unknown token {token_id}: revoked meanwhile")
            check_usable(token_id, rec, now)
            rec["used"] = int(rec.get("used", 0)) + 1
            rec.setdefault("joined", []).append({**who, "at": now})
            self._save(doc, now)
            return rec


def check_usable(token_id: str, rec: dict, now: float) -> None:
    if now >= float(rec.get("expires", 0)):
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(rec.get("expires", 0))))
        raise TokenExpired(f"token {token_id} expired at {at}: run `mlxmoe token` on the first Mac for a new one")
    if int(rec.get("used", 0)) >= int(rec.get("uses", 1)):
        n = int(rec.get("uses", 1))
        raise TokenUsed(f"token {token_id} was already used ({n} use{'s' if n != 1 else ''}): run `mlxmoe token` "
                        f"on the first Mac for a new one (--uses N for several Macs)")


def _first_mac_files(home: Path) -> tls.Identity:
    ident = tls.Identity.in_dir(home)
    if not ident.ca.exists() or not ident.ca_key.exists():
        raise JoinError(f"no cluster CA with its key in {home}: make join tokens on the Mac that holds ca.key "
                        f"(run `mlxmoe init` there first)")
    return ident


def create_token(home: str | Path | None = None, *, ttl: float = TOKEN_TTL_S, uses: int = 1,
                 host: str | None = None, port: int = JOIN_PORT, clock: Callable[[], float] = time.time) -> JoinToken:
    """A new join token, stored (its verifier only) in home's tokens.json.
    `host`/`port`: where the joiner reaches this Mac's join server (default:
    this Mac's LAN address, JOIN_PORT)."""
    home = Path(home).expanduser() if home else default_home()
    ident = _first_mac_files(home)
    if ttl < 0 or uses < 1:
        raise ValueError("ttl must be >= 0 and uses >= 1")
    if not (home / "cluster.key").exists():
        raise JoinError(f"no cluster key at {home / 'cluster.key'}: run `mlxmoe init` on this Mac first")
    fp = ca_fingerprint(ident.ca.read_bytes())[:FP_HEX]
    store, now = TokenStore(home), clock()
    for _ in range(8):
        token_id = "".join(secrets.choice(_ALNUM) for _ in range(6))
        if store.get(token_id) is None:
            break
    secret = "".join(secrets.choice(_ALNUM) for _ in range(16))
    tok = JoinToken(token_id, secret, (host or default_address()).strip("[]"), int(port), fp)
    try:
        parse_token(str(tok))  # a host the joiner could not parse fails here, not there
    except MalformedToken:
        raise JoinError(f"{tok.host!r} cannot be a token's address: give --host an IP address or a host name "
                        f"(letters, digits, '.', '-')") from None
    store.add(token_id, verifier(token_id, secret), now + ttl, int(uses), now)
    return tok


# ---------------------------------------------------------------- sealing the answer
def seal(public_key: ec.EllipticCurvePublicKey, context: bytes, payload: bytes) -> dict:
    """Encrypt `payload` so that only the holder of `public_key`'s private key reads it
    (ephemeral ECDH P-256, HKDF-SHA256, AES-256-GCM with `context` as associated data)."""
    eph = ec.generate_private_key(ec.SECP256R1())
    key = HKDF(hashes.SHA256(), 32, salt=None, info=context).derive(eph.exchange(ec.ECDH(), public_key))
    iv = os.urandom(12)
    epk = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"epk": _b64(epk), "sealed": _b64(iv + AESGCM(key).encrypt(iv, payload, context))}


def open_sealed(private_key: ec.EllipticCurvePrivateKey, context: bytes, answer: dict) -> bytes:
    """seal()'s payload, or BadAnswer if it was not sealed for this key and context."""
    try:
        epk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unb64(answer["epk"]))
        blob = _unb64(answer["sealed"])
        key = HKDF(hashes.SHA256(), 32, salt=None, info=context).derive(private_key.exchange(ec.ECDH(), epk))
        return AESGCM(key).decrypt(blob[:12], blob[12:], context)
    except (KeyError, TypeError, ValueError, InvalidTag):
        raise BadAnswer("the first Mac's answer was not sealed for this request: someone in between, "
                        "or not an mlxmoe join server") from None


# ---------------------------------------------------------------- server
JOIN_SERVER = web.AppKey("mlxmoe_join", object)


class JoinServer:
    """The join endpoint's state: the CA and cluster key (read once), the
    token store (read at every join), outstanding nonces, and failed proofs
    per address. `stats` counts hellos, join requests, grants and refusals."""

    def __init__(self, home: str | Path, *, key_path: str | Path | None = None,
                 clock: Callable[[], float] = time.time, failures_per_minute: int = FAILURES_PER_MINUTE):
        self.home = Path(home).expanduser()
        ident = _first_mac_files(self.home)
        self.ca_pem, self.ca_key_pem = ident.ca.read_bytes(), ident.ca_key.read_bytes()
        self.fp = ca_fingerprint(self.ca_pem)
        try:
            self.cluster_key = keys.load_key(key_path or self.home / "cluster.key")
        except keys.ClusterKeyError as e:
            raise JoinError(str(e)) from None
        self.name = tls.cert_name(ident.cert.read_bytes()) if ident.cert.exists() else default_name()
        self.tokens = TokenStore(self.home)
        self.clock = clock
        self.failures_per_minute = int(failures_per_minute)
        self.nonces: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.failures: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.checking: collections.Counter = collections.Counter()  # joins being verified, per address
        self.logged: dict[str, tuple[float, int]] = {}  # address -> (window end, refusals logged; -1: muted)
        self.stats: collections.Counter = collections.Counter()

    # ---- nonces and failures
    def _new_nonce(self, addr: str) -> str:
        now = time.monotonic()
        while self.nonces and next(iter(self.nonces.values()))[1] <= now:
            self.nonces.popitem(last=False)
        mine = [n for n, (a, _) in self.nonces.items() if a == addr]
        for n in mine[:max(0, len(mine) - NONCES_PER_ADDRESS + 1)]:
            del self.nonces[n]
        while len(self.nonces) >= MAX_NONCES:
            self.nonces.popitem(last=False)
        nonce = _b64(os.urandom(16))
        self.nonces[nonce] = (addr, now + NONCE_TTL_S)
        return nonce

    def _take_nonce(self, nonce: str) -> None:
        got = self.nonces.pop(nonce, None)
        if got is None or got[1] <= time.monotonic():
            raise StaleNonce("unknown or stale nonce: ask /join/hello again (the joiner does this by itself; "
                             "retry the join)")

    def _check_rate(self, addr: str) -> None:
        q = self.failures.get(addr) or collections.deque()
        now = time.monotonic()
        while q and q[0] <= now - 60.0:
            q.popleft()
        if len(q) + self.checking.get(addr, 0) >= self.failures_per_minute:
            e = TooManyFailures(f"too many failed join attempts from {addr} ({len(q)} in a minute): "
                                f"wait a minute, and check the token")
            e.retry_after = max(1.0, 60.0 - (now - q[0])) if q else 1.0
            raise e

    def _failed(self, addr: str) -> None:
        q = self.failures.pop(addr, None) or collections.deque()
        q.append(time.monotonic())
        self.failures[addr] = q  # most recent last
        while len(self.failures) > MAX_ADDRESSES:
            self.failures.popitem(last=False)

    # ---- handlers
    async def hello(self, request: web.Request) -> web.Response:
        """GET /join/hello: the CA certificate (to check against the token) and a nonce."""
        self.stats["hello"] += 1
        return web.json_response({"v": 1, "ca": self.ca_pem.decode(), "name": self.name,
                                  "nonce": self._new_nonce(request.remote or "?")})

    async def join(self, request: web.Request) -> web.Response:
        """POST /join: a proof and a CSR in, a sealed certificate, CA and cluster key out."""
        addr = request.remote or "?"
        self.stats["join"] += 1
        try:
            data = await self._read(request)  # (bounded) even when refused: a client sees the answer, not a reset
            self._check_rate(addr)
            self.checking[addr] += 1  # counted as a failure meanwhile: parallel guesses get no extra tries
            try:
                body = parse_join_body(data)
                self._take_nonce(body["nonce"])
                answer = await asyncio.to_thread(self._grant, body, addr)
            except (UnknownToken, BadProof):
                self._failed(addr)
                raise
            finally:
                self.checking[addr] -= 1
                if not self.checking[addr]:
                    del self.checking[addr]
        except JoinError as e:
            return self._refuse(addr, e)
        self.stats["granted"] += 1
        return web.json_response(answer)

    async def _read(self, request: web.Request) -> bytes:
        n = request.content_length
        if n is None:
            raise MalformedJoin("a join request needs a Content-Length (no chunked body)")
        if n > MAX_BODY:
            raise TooLarge(f"a join request is at most {MAX_BODY} bytes (this one says {n})")
        try:
            return await asyncio.wait_for(request.content.readexactly(n), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise MalformedJoin(f"the join request's body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
        except asyncio.IncompleteReadError as e:
            raise MalformedJoin(f"the join request's body ended after {len(e.partial)} of the {n} bytes "
                                f"announced") from None
        except (ConnectionError, ValueError) as e:  # aiohttp's payload errors are ValueErrors
            raise MalformedJoin(f"the join request's body could not be read ({type(e).__name__})") from None

    def _grant(self, body: dict, addr: str) -> dict:
        """Verify and sign (on a thread: file lock, CA signature)."""
        token_id = body["id"]
        rec = self.tokens.get(token_id)
        if rec is None:
            raise UnknownToken(f"unknown token {token_id}: never made on this Mac, or expired more than a day ago; "
                               f"run `mlxmoe token` there for a new one")
        csr_pem = body["csr"].encode("ascii")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(rec.get("verifier")))).verify(
                _unb64(body["proof"]), _context("proof", token_id, body["nonce"], csr_pem, self.fp))
        except (InvalidSignature, ValueError, TypeError):
            raise BadProof(f"wrong secret for token {token_id} (its proof does not verify): copy the whole token "
                           f"again") from None
        try:
            csr, name, hosts = tls.csr_request(csr_pem)
        except ValueError as e:
            raise MalformedJoin(f"csr: {e}") from None
        check_usable(token_id, rec, self.clock())  # before the lock: a used token costs no lock
        self.tokens.consume(token_id, self.clock(), {"name": name, "from": addr})
        cert = tls.sign_csr(self.ca_pem, self.ca_key_pem, csr_pem)
        payload = json.dumps({"cert": cert.decode(), "ca": self.ca_pem.decode(),
                              "cluster_key": self.cluster_key.hex()}).encode()
        log.info("join: token %s gave %s (from %s) a certificate for %s", token_id, name, addr,
                 ", ".join([name, *hosts]))
        return {"v": 1, "name": name, **seal(csr.public_key(), _context("answer", token_id, body["nonce"], csr_pem,
                                                                         self.fp), payload)}

    def _refuse(self, addr: str, e: JoinError) -> web.Response:
        self.stats["refused"] += 1
        self.stats[e.code] += 1
        headers = {}
        if isinstance(e, TooManyFailures):
            headers["Retry-After"] = str(int(e.retry_after + 0.999))
        self._log_refusal(addr, e)
        resp = web.json_response({"error": {"code": e.code, "message": str(e)}}, status=e.status, headers=headers)
        resp.force_close()
        return resp

    def _log_refusal(self, addr: str, e: JoinError) -> None:
        """One line per refusal; but a rate-limited address gets one line a minute, and
        any address at most LOG_PER_MINUTE lines a minute (a flood is not a log flood)."""
        now = time.monotonic()
        if len(self.logged) > MAX_ADDRESSES:
            self.logged = {a: v for a, v in self.logged.items() if v[0] > now}
        until, n = self.logged.get(addr, (0.0, 0))
        if until <= now:
            until, n = now + 60.0, 0
        if isinstance(e, TooManyFailures):
            if n >= 0:
                log.warning("join refused for %s: %s (further refusals of %s for a minute are not logged)", addr, e, addr)
                self.logged[addr] = (now + 60.0, -1)
            return
        if n < 0:
            return
        if n < LOG_PER_MINUTE:
            log.warning("join refused for %s: %s", addr, e)
        elif n == LOG_PER_MINUTE:
            log.warning("join refused for %s: %s (further refusals of %s this minute are not logged)", addr, e, addr)
        self.logged[addr] = (until, n + 1)


def parse_join_body(data: bytes) -> dict:
    """The join request's JSON, checked field by field, or MalformedJoin naming the field."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise MalformedJoin("the join request is not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedJoin("the join request must be a JSON object")
    fields = {"v", "id", "nonce", "csr", "proof"}
    if set(doc) != fields:
        extra, missing = sorted(set(doc) - fields), sorted(fields - set(doc))
        raise MalformedJoin(f"the join request's fields must be {sorted(fields)}"
                            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra[:5]}" if extra else ""))
    if doc["v"] != 1 or isinstance(doc["v"], bool):
        raise MalformedJoin("v: this server speaks join protocol 1")
    checks = {"id": _ID_RE, "nonce": _NONCE_RE, "proof": _PROOF_RE}
    for field, rx in checks.items():
        if not isinstance(doc[field], str) or not rx.fullmatch(doc[field]):
            raise MalformedJoin(f"{field}: malformed")
    csr = doc["csr"]
    if not isinstance(csr, str) or not csr.isascii() or not 0 < len(csr) <= 8192:
        raise MalformedJoin("csr: must be a PEM certificate signing request (ASCII, at most 8 KB)")
    return doc


def join_app(home: str | Path, **kw) -> web.Application:
    """The join endpoint as an aiohttp application: `GET /join/hello` and
    `POST /join` (docs/SECURITY.md, "Joining"). Serve it over TLS without
    client certificates (start_join does). `kw`: JoinServer's (key_path,
    clock, failures_per_minute); the JoinServer is `app[JOIN_SERVER]`."""
    server = JoinServer(home, **kw)
    app = web.Application(client_max_size=MAX_BODY)
    app[JOIN_SERVER] = server
    app.router.add_get("/join/hello", server.hello)
    app.router.add_post("/join", server.join)
    return app


def server_context(ident: tls.Identity) -> ssl.SSLContext:
    """TLS 1.3 with this Mac's CA-signed certificate, asking no client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    return ctx


class RunningJoin:
    """A started join server: `.server` (JoinServer), `.port`, `.url`, `stop()`."""

    def __init__(self, server: JoinServer, runner: web.AppRunner, host: str, port: int):
        self.server, self.runner, self.host, self.port = server, runner, host, port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"https://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_join(home: str | Path | None = None, host: str = "0.0.0.0", port: int = JOIN_PORT, *,
                     name: str | None = None, limits: Limits = Limits(max_connections=64, per_address=16),
                     routes: Callable[[web.Application], None] | None = None, **kw) -> RunningJoin:
    """Serve the join endpoint of the Mac whose config home is `home` (it
    must hold ca.pem, ca.key and cluster.key; its own certificate is issued
    if missing) on host:port over TLS, behind the same connection limits as a
    node. `routes(app)` adds routes of its own (`mlxmoe up`'s enrollment).
    `kw`: JoinServer's (key_path, clock, failures_per_minute)."""
    home = Path(home).expanduser() if home else default_home()
    _first_mac_files(home)
    ident = tls.ensure_identity(home, name or default_name(), tls.default_hosts(host))
    app = join_app(home, **kw)
    if routes is not None:
        routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                           keepalive_timeout=5.0, **HTTP_LIMITS)
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, ssl_context=server_context(ident), name="join", limits=limits)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningJoin(app[JOIN_SERVER], runner, host, site.port)


async def serve_join(home: str | Path | None = None, host: str = "0.0.0.0", port: int = JOIN_PORT, *,
                     until_spent: str | None = None, ready: Callable[[RunningJoin], None] | None = None,
                     **kw) -> None:
    """Run the join server until SIGINT/SIGTERM, or, with `until_spent` (a
    token id), until that token is used up or expired."""
    from mlxmoe.cluster.worker import until_signalled

    running = await start_join(home, host, port, **kw)
    if ready:
        ready(running)
    waits = [asyncio.ensure_future(until_signalled())]
    if until_spent:
        waits.append(asyncio.ensure_future(_until_spent(running.server, until_spent)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await running.stop()


async def _until_spent(server: JoinServer, token_id: str, every: float = 1.0) -> None:
    while True:
        rec = server.tokens.get(token_id)
        if rec is None:
            return
        try:
            check_usable(token_id, rec, server.clock())
        except JoinError:
            return
        await asyncio.sleep(every)


# ---------------------------------------------------------------- client
def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only for the hello: nothing secret goes over it
    return ctx


def _pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # LAN addresses change; the CA is what counts (tls.py)
    ctx.load_verify_locations(cadata=ca_pem.decode())  # this CA only
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _mismatch(token: JoinToken, got: str) -> CaMismatch:
    return CaMismatch(f"the cluster's CA does not match the token: another cluster, or someone in between "
                      f"({token.address} shows sha256:{got[:FP_HEX]}, the token says sha256:{token.fingerprint})")


def _call(token: JoinToken, method: str, path: str, body: dict | None, ctx: ssl.SSLContext,
          timeout: float) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    conn = http.client.HTTPSConnection(token.host, token.port, context=ctx, timeout=timeout)
    try:
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json", "Connection": "close"} if data else {})
        resp = conn.getresponse()
        raw = resp.read(MAX_ANSWER + 1)
    except ssl.SSLCertVerificationError:
        raise CaMismatch(f"the cluster's CA does not match the token: another cluster, or someone in between "
                         f"({token.address} showed the token's CA, then a certificate that CA did not sign)") from None
    except (OSError, http.client.HTTPException) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
        raise JoinUnreachable(f"cannot reach the first Mac at {token.address} ({why}): is `mlxmoe up` (or "
                              f"`mlxmoe token --serve`) running there, and is this Mac on its network?") from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw) if len(raw) <= MAX_ANSWER else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise BadAnswer(f"{token.address} answered HTTP {resp.status} with something that is not a join answer: "
                        f"is that port an mlxmoe join server?")
    if resp.status != 200:
        err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
        cls = _BY_CODE.get(str(err.get("code")), JoinError)
        msg = " ".join(str(err.get("message") or f"HTTP {resp.status}").split())[:400]
        raise cls(f"the first Mac refused: {msg}")
    return doc


def join(token: str | JoinToken, home: str | Path | None = None, *, name: str | None = None,
         hosts: list[str] | None = None, force: bool = False, timeout: float = 10.0) -> tls.Identity:
    """Join the cluster of the first Mac named by `token` (docs/SECURITY.md,
    "Joining"), and write this Mac's cluster.key, ca.pem, cert.pem and cert.key
    (keys 0600) into `home` (default: the config home, $MLXMOE_HOME or
    ~/.config/mlxmoe); nothing else, and nothing at all on any refusal.

    `name`: this Mac's name in its certificate (default: its short host name);
    `hosts`: the addresses it also names (default: tls.default_hosts()).
    Raises a JoinError subclass: MalformedToken, AlreadyMember (home already
    holds a cluster's files; `force` replaces them), JoinUnreachable,
    CaMismatch (before anything secret is sent), UnknownToken, BadProof,
    TokenExpired, TokenUsed, TooManyFailures, BadAnswer."""
    tok = token if isinstance(token, JoinToken) else parse_token(token)
    home = Path(home).expanduser() if home else default_home()
    ident = tls.Identity.in_dir(home)
    key_path = home / "cluster.key"
    present = [p for p in (key_path, ident.ca, ident.cert, ident.key) if p.exists()]
    if present and not force:
        raise AlreadyMember(f"{present[0]} exists: this Mac already belongs to a cluster (pass --force to replace "
                            f"its key, CA and certificate with the new cluster's)")
    name = name or default_name()
    hosts = [h for h in (tls.default_hosts() if hosts is None else hosts) if _plain_host(h)]

    csr_pem, key_pem = tls.make_csr(name, hosts)
    for attempt in (1, 2):  # a nonce pushed out by someone else's hellos: ask again, once
        hello = _call(tok, "GET", "/join/hello", None, _unverified_context(), timeout)
        try:
            ca_pem = str(hello["ca"]).encode()
            got = ca_fingerprint(ca_pem)
            nonce = str(hello["nonce"])
        except (KeyError, ValueError, TypeError):
            raise BadAnswer(f"{tok.address} did not send a cluster CA: is that port an mlxmoe join server?") from None
        if not secrets.compare_digest(got[:len(tok.fingerprint)], tok.fingerprint):
            raise _mismatch(tok, got)  # before anything secret is sent
        body = {"v": 1, "id": tok.id, "nonce": nonce, "csr": csr_pem.decode(),
                "proof": prove(tok, nonce, csr_pem, got)}
        try:
            answer = _call(tok, "POST", "/join", body, _pinned_context(ca_pem), timeout)
            break
        except StaleNonce:
            if attempt == 2:
                raise

    key = serialization.load_pem_private_key(key_pem, None)
    payload = open_sealed(key, _context("answer", tok.id, nonce, csr_pem, got), answer)
    try:
        doc = json.loads(payload)
        cert_pem, ca2, cluster_key = doc["cert"].encode(), doc["ca"].encode(), bytes.fromhex(doc["cluster_key"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BadAnswer("the first Mac's answer is incomplete") from None
    if ca2 != ca_pem or tls.cert_problem(cert_pem, ca_pem) is not None or not _same_key(cert_pem, key):
        raise BadAnswer("the first Mac's answer does not hold a certificate of this key signed by the token's CA")
    if len(cluster_key) < 16:
        raise BadAnswer("the first Mac's answer holds no usable cluster key")

    _write_all(home, {ident.key: (key_pem, 0o600), ident.cert: (cert_pem, 0o644), ident.ca: (ca_pem, 0o644),
                      key_path: (cluster_key.hex().encode() + b"\n", 0o600)})
    if force:
        ident.ca_key.unlink(missing_ok=True)  # another cluster's CA key would sign for the wrong CA
    log.info("joined the cluster of %s as %s; wrote %s", tok.address, name, home)
    return ident


def _same_key(cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(*spki) == \
        key.public_key().public_bytes(*spki)


def _plain_host(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return bool(h) and len(h) <= 253 and re.fullmatch(r"[A-Za-z0-9._-]+", h) is not None


def _write_all(home: Path, files: dict[Path, tuple[bytes, int]]) -> None:
    """Every file written beside its place first, then all renamed in: no half set on a full disk."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmps = []
    try:
        for path, (data, mode) in files.items():
            tmp = path.with_name(path.name + ".join-tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)
        for path in files:
            os.replace(path.with_name(path.name + ".join-tmp"), path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
