"""Finding nodes: Bonjour/mDNS (`_mlxmoe._tcp.local.`) and static peers.

Advertiser - a node registers itself; TXT: proto, mh, model, groups, free,
             sessions (no secrets). TXT is refreshed when those change (at
             most once a second, to be polite on the LAN).
Browser    - the router's live view of the service type: records added,
             updated and removed as Bonjour reports them.
PeerTable  - the router's peers from both sources, with the policy that
             ignores peers of another manifest hash or protocol (and says why).

`interface` picks the one IPv4 address zeroconf binds to (None = all), so a
router and nodes in separate network namespaces use only their own link.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mlxmoe import wire

log = logging.getLogger("mlxmoe.discovery")
SERVICE_TYPE = "_mlxmoe._tcp.local."
TXT_MIN_INTERVAL_S = 1.0


def _interfaces(interface: str | None):
    from zeroconf import InterfaceChoice
    return [interface] if interface else InterfaceChoice.All


def local_ipv4s() -> list[str]:
    import ifaddr
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(ip.ip)
    return out or ["127.0.0.1"]


def txt_props(identity: dict, stats: dict, tls: bool = False) -> dict:
    props = {"proto": str(wire.PROTOCOL_VERSION), "mh": identity["manifest_hash"], "model": identity["model"],
             "groups": ",".join(str(g) for g in identity["groups"]),
             "free": str(int(stats.get("free_memory", 0))), "sessions": str(int(stats.get("sessions", 0)))}
    if tls:
        props["tls"] = "1"  # the node speaks only mutual TLS: dial https (cluster/tls.py)
    return props


class Advertiser:
    def __init__(self, port: int, props: dict, interface: str | None = None, host_ip: str | None = None,
                 name: str | None = None):
        self.port, self.props, self.interface = port, dict(props), interface
        ips = [host_ip] if host_ip and host_ip not in ("0.0.0.0", "") else ([interface] if interface else local_ipv4s())
        self.ips = ips
        host = socket.gethostname().split(".")[0] or "mac"
        self.name = name or f"{host}-g{props.get('groups', '')}-{port}".replace(",", "_")  # = default_name()
        self.azc = None
        self.info = None
        self._last_update = 0.0
        self._pending: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf
        self.azc = AsyncZeroconf(interfaces=_interfaces(self.interface), ip_version=IPVersion.V4Only)
        self.info = self._service_info(f"{self.name}.{SERVICE_TYPE}")
        await self.azc.async_register_service(self.info, allow_name_change=True)
        self.name = self.info.name.removesuffix("." + SERVICE_TYPE)  # "name (2)" if another service had it
        self._last_update = time.monotonic()
        log.info("advertising %s on %s:%d", self.info.name, ",".join(self.ips), self.port)

    def _service_info(self, full_name: str):
        from zeroconf.asyncio import AsyncServiceInfo
        return AsyncServiceInfo(SERVICE_TYPE, full_name, port=self.port, properties=self.props,
                                addresses=[socket.inet_aton(ip) for ip in self.ips], server=f"{self.name}.local.")

    def update(self, props: dict) -> None:
        """New TXT values; sent now or after the rate limit expires."""
        if props == self.props:
            return
        self.props = dict(props)  # not yet registered: start() sends these
        if self.azc is None or self._pending is not None:
            return
        wait = max(0.0, TXT_MIN_INTERVAL_S - (time.monotonic() - self._last_update))
        self._pending = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        self._pending = None
        if self.azc is None or self.info is None:
            return
        self.info = self._service_info(self.info.name)  # same name (maybe renamed on conflict), new TXT
        self._last_update = time.monotonic()
        asyncio.ensure_future(self.azc.async_update_service(self.info))

    async def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self.azc is not None:
            try:
                await self.azc.async_unregister_service(self.info)
            finally:
                await self.azc.async_close()
            self.azc = None


def record_from_info(info) -> dict | None:
    """A plain record from a resolved ServiceInfo (None if it has no IPv4 address)."""
    addrs = [a for a in info.parsed_addresses() if ":" not in a]
    if not addrs or not info.port:
        return None
    props = {(k.decode() if isinstance(k, bytes) else k): (v.decode(errors="replace") if isinstance(v, bytes) else (v or ""))
             for k, v in (info.properties or {}).items()}
    scheme = "https" if props.get("tls") == "1" else "http"
    return {"name": info.name.removesuffix("." + SERVICE_TYPE), "url": f"{scheme}://{addrs[0]}:{info.port}",
            "txt": props}


class Browser:
    """Calls on_change(name, record) when a node appears/changes, and
    on_change(name, None) when it leaves."""

    def __init__(self, on_change: Callable[[str, dict | None], None], interface: str | None = None):
        self.on_change, self.interface = on_change, interface
        self.azc = None
        self.browser = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf
        self.azc = AsyncZeroconf(interfaces=_interfaces(self.interface), ip_version=IPVersion.V4Only)
        self.browser = AsyncServiceBrowser(self.azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state])

    def _on_state(self, zeroconf, service_type: str, name: str, state_change) -> None:
        from zeroconf import ServiceStateChange
        short = name.removesuffix("." + SERVICE_TYPE)
        if state_change is ServiceStateChange.Removed:
            self.on_change(short, None)
            return
        t = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(self.azc.zeroconf, 3000):
            rec = record_from_info(info)
            if rec is not None:
                self.on_change(rec["name"], rec)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.browser is not None:
            await self.browser.async_cancel()
        if self.azc is not None:
            await self.azc.async_close()


# ---------------------------------------------------------------- peers

NOT_PROBED, WAITING = "not probed yet", "waiting for an authenticated info answer"  # a new peer's state


@dataclass
class Peer:
    name: str
    url: str
    source: str  # "mdns" | "static"
    groups: list[int] = field(default_factory=list)
    manifest_hash: str | None = None
    protocol: int | None = None
    model: str | None = None
    free_memory: int = 0
    active_sessions: int = 0
    state: str = "down"  # "up" | "ignored" | "down"
    reason: str | None = NOT_PROBED
    backend: str | None = None
    moe_path: str | None = None  # the node's single-token MoE path (model/fused.py)
    last_seen: float = 0.0
    verified: bool = False  # answered an authenticated info RPC
    inflight: int = 0  # streams this router has open on it
    streams: int = 0  # streams the node is decoding, and waiting (its queue depth), as of its last info
    queued: int = 0
    bonjour: bool = False  # a Bonjour record names it (a static peer may have one too)

    def status(self) -> dict:
        d = asdict(self)
        for k in ("model", "last_seen", "verified", "inflight", "streams", "queued"):  # load: Router.status
            d.pop(k)
        return d


def load_static_peers(path: str | Path) -> list[str]:
    """URLs from a TOML file with [[peers]] url = "http://host:port" entries."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"peers file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"peers file {path}: {e}") from None
    urls = []
    for i, p in enumerate(data.get("peers", [])):
        url = p.get("url") if isinstance(p, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"peers file {path}: peers[{i}].url must be a string like \"http://192.168.1.20:7420\"")
        urls.append(url.rstrip("/"))
    return urls


def https(url: str) -> str:
    """A peer URL as a TLS router dials it (a peers file or an old node's
    Bonjour record may still say http://)."""
    return "https://" + url[len("http://"):] if url.startswith("http://") else url


class PeerTable:
    """tls: the router speaks only mutual TLS, so every peer is dialled over
    https, whatever its record says: a plain-HTTP impostor on the LAN would
    otherwise be sent prompts in clear (docs/SECURITY.md)."""

    def __init__(self, manifest_hash: str, n_groups: int, model: str | None = None, tls: bool = False):
        self.manifest_hash, self.n_groups, self.model = manifest_hash, n_groups, model
        self.peers: dict[str, Peer] = {}
        self.scheme = https if tls else (lambda url: url)

    def add_static(self, url: str) -> Peer:
        url = self.scheme(url)
        p = self.peers.setdefault(url, Peer(name=url, url=url, source="static"))
        return p

    def by_url(self, url: str) -> Peer | None:
        return next((p for p in self.peers.values() if p.url == url), None)

    def from_mdns(self, name: str, rec: dict | None) -> None:
        """Browser callback: a node appeared/changed (rec) or left (None)."""
        if rec is None:
            p = self.peers.get(name)
            if p is not None and p.source == "mdns":
                self._set(p, "down", "left the network (Bonjour goodbye)")
            return
        txt, url = rec["txt"], self.scheme(rec["url"])
        p = self.peers.get(name)
        if p is None or p.url != url:
            p = self.by_url(url)
            if p is None or p.source != "static":
                p = self.peers[name] = Peer(name=name, url=url, source="mdns")
            elif p.name == p.url:
                p.name = name  # a --peers node that Bonjour also shows is one peer, with its advertised name
        p.bonjour = True
        try:
            p.protocol = int(txt.get("proto", "0"))
            p.groups = [int(g) for g in txt.get("groups", "").split(",") if g.strip()]
            p.free_memory = int(txt.get("free", "0"))
            p.active_sessions = int(txt.get("sessions", "0"))
        except ValueError:
            self._set(p, "ignored", f"malformed Bonjour TXT record {txt}")
            return
        p.manifest_hash, p.model, p.last_seen = txt.get("mh"), txt.get("model"), time.time()
        self.evaluate(p, keep_down=not p.verified)

    def from_info(self, p: Peer, info: dict) -> None:
        """An authenticated info RPC answered: it is the ground truth."""
        groups = [int(g) for g in info.get("groups", [])]
        if p.bonjour and p.groups and sorted(groups) != sorted(p.groups):
            self._set(p, "ignored", f"advertises groups {p.groups} over Bonjour but serves {groups}")
            return
        p.groups, p.manifest_hash = groups, info.get("manifest_hash")
        p.protocol, p.model = info.get("protocol"), info.get("model")
        p.free_memory = int(info.get("free_memory") or 0)
        p.active_sessions = int(info.get("sessions") or 0)
        p.backend, p.moe_path = info.get("backend"), info.get("moe_path")
        p.last_seen, p.verified = time.time(), True
        if p.source == "static" and p.name == p.url and info.get("node_name"):
            p.name = str(info["node_name"])
        self.evaluate(p, keep_down=False)

    def evaluate(self, p: Peer, keep_down: bool) -> None:
        if p.protocol != wire.PROTOCOL_VERSION:
            return self._set(p, "ignored", f"speaks protocol {p.protocol}, this router speaks {wire.PROTOCOL_VERSION}")
        if p.manifest_hash != self.manifest_hash:
            return self._set(p, "ignored", f"manifest hash {p.manifest_hash} differs from this router's "
                                           f"{self.manifest_hash} (another model or revision)")
        bad = [g for g in p.groups if not 0 <= g < self.n_groups]
        if not p.groups or bad:
            return self._set(p, "ignored", f"groups {p.groups} are not in 0..{self.n_groups - 1}")
        if keep_down and p.state == "down":
            self._set(p, "down", WAITING)
        else:
            self._set(p, "up", None)

    def mark_down(self, p: Peer, reason: str) -> None:
        self._set(p, "down", reason)

    def _set(self, p: Peer, state: str, reason: str | None) -> None:
        if (p.state, p.reason) != (state, reason) and reason not in (NOT_PROBED, WAITING):  # not yet known: no news
            # a peer never seen up that is down (a node still loading as the router starts) is not news either:
            # the router warns once if no node comes up (Fleet._warn_if_alone)
            first_down = state == "down" and p.reason in (NOT_PROBED, WAITING)
            news = log.warning if state == "ignored" else log.debug if first_down else log.info
            news("peer %s (%s): %s%s", p.name, p.url, state, f" - {reason}" if reason else "")
        p.state, p.reason = state, reason

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.state == "up"]

    def status(self) -> list[dict]:
        return [p.status() for p in sorted(self.peers.values(), key=lambda p: p.name)]
