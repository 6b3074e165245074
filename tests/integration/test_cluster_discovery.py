"""Peer table policy (which peers are used, which ignored and why), Bonjour
TXT records, and static peers files. Real multicast discovery is exercised in
test_cluster_netns.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxmoe import wire
from mlxmoe.cluster.discovery import PeerTable, load_static_peers, txt_props
from mlxmoe.cluster.node_server import engine_identity

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).parents[2]


def rec(mh="h1", proto=str(wire.PROTOCOL_VERSION), groups="1", url="http://10.0.0.2:7420", **txt):
    return {"name": "mac-g1", "url": url,
            "txt": {"proto": proto, "mh": mh, "model": "m", "groups": groups, "free": "100", "sessions": "2", **txt}}


def info(groups=(1,), mh="h1"):
    return {"groups": list(groups), "manifest_hash": mh, "protocol": wire.PROTOCOL_VERSION, "model": "m",
            "free_memory": 5, "sessions": 3, "backend": "metal",
            "moe_path": "fused-metal"}


def test_mdns_peer_waits_for_authenticated_info_then_up():
    t = PeerTable("h1", 3)
    t.from_mdns("mac-g1", rec())
    p = t.peers["mac-g1"]
    assert p.state == "down" and "authenticated" in p.reason and p.groups == [1] and p.active_sessions == 2
    t.from_info(p, info())
    assert p.state == "up" and p.reason is None and p.backend == "metal" and p.active_sessions == 3
    t.from_mdns("mac-g1", rec(sessions="7"))  # TXT update keeps it up
    assert p.state == "up" and p.active_sessions == 7
    t.from_mdns("mac-g1", None)
    assert p.state == "down" and "goodbye" in p.reason
    assert [x.name for x in t.live()] == []


def test_a_static_peer_seen_over_bonjour_is_one_peer():
    """`mlxmoe up` gives the router its own node by URL and the node also advertises itself: one peer, named
    as it advertises, still probed as a static peer (a Bonjour goodbye does not drop it)."""
    t = PeerTable("h1", 3)
    p = t.add_static("http://10.0.0.2:7420")
    t.from_mdns("mac-g1", rec())
    assert list(t.peers.values()) == [p] and p.name == "mac-g1" and p.source == "static" and p.bonjour
    assert p.groups == [1]
    t.from_info(p, info())
    t.from_mdns("mac-g1", None)
    assert p.state == "up" and [x.name for x in t.live()] == ["mac-g1"]


@pytest.mark.parametrize("kw,why", [
    ({"mh": "other"}, "manifest hash other"),
    ({"proto": "99"}, "protocol 99"),
    ({"groups": "7"}, "groups [7]"),
    ({"groups": "x"}, "malformed"),
])
def test_mdns_peers_ignored_with_reason(kw, why):
    t = PeerTable("h1", 3)
    t.from_mdns("mac-g1", rec(**kw))
    p = t.peers["mac-g1"]
    assert p.state == "ignored" and why in p.reason
    assert t.status()[0]["state"] == "ignored" and why in t.status()[0]["reason"]


def test_node_lying_about_its_group_is_ignored():
    t = PeerTable("h1", 3)
    t.from_mdns("mac-g1", rec(groups="1"))
    t.from_info(t.peers["mac-g1"], info(groups=(2,)))
    assert t.peers["mac-g1"].state == "ignored" and "serves [2]" in t.peers["mac-g1"].reason


def test_static_peer_named_by_node_and_status_fields():
    t = PeerTable("h1", 3)
    p = t.add_static("http://10.0.0.9:7420")
    assert p.state == "down" and p.reason == "not probed yet"
    t.from_info(p, {**info(), "node_name": "studio-g1-7420"})
    st = t.status()[0]
    assert st["name"] == "studio-g1-7420" and st["state"] == "up" and st["source"] == "static"
    assert st["moe_path"] == "fused-metal"
    assert set(st) == {"name", "url", "source", "groups", "manifest_hash", "protocol", "free_memory",
                       "active_sessions", "state", "reason", "backend", "moe_path", "bonjour"}


def test_txt_has_no_secrets_and_round_trips():
    ident = {"model": "m", "manifest_hash": "h1", "groups": [0, 2], "n_groups": 3}
    props = txt_props(ident, {"free_memory": 123, "sessions": 4})
    assert props == {"proto": str(wire.PROTOCOL_VERSION), "mh": "h1", "model": "m", "groups": "0,2",
                     "free": "123", "sessions": "4"}
    t = PeerTable("h1", 3)
    t.from_mdns("x", {"name": "x", "url": "http://1.2.3.4:1", "txt": props})
    assert t.peers["x"].groups == [0, 2] and t.peers["x"].free_memory == 123


def test_engine_identity_from_the_engine_contract():
    from fakes import FakeEngine
    e = FakeEngine(group=2, manifest_hash="abc")
    assert engine_identity(e) == {"model": "fake-moe", "manifest_hash": "abc", "n_groups": 3, "groups": [2]}


def test_static_peers_file(tmp_path):
    assert load_static_peers(ROOT / "configs" / "cluster.example.toml")[0] == "http://192.168.1.20:7420"
    f = tmp_path / "p.toml"
    f.write_text('[[peers]]\nurl = "ftp://x"\n')
    with pytest.raises(ValueError, match=r"peers\[0\].url"):
        load_static_peers(f)
    f.write_text("[[peers]\n")
    with pytest.raises(ValueError, match="p.toml"):
        load_static_peers(f)
    with pytest.raises(ValueError, match="not found"):
        load_static_peers(tmp_path / "none.toml")
    f.write_text("")
    assert load_static_peers(f) == []
