import sys

import pytest
from click.testing import CliRunner

from mlxmoe.commands.menubar import menubar_cmd
from mlxmoe.ui.menubar import MenubarState, MenubarUnavailable, run_menubar
from ui_fake_server import FakeRouter, sample_status

URL = "http://127.0.0.1:8000"


def enabled(state):
    return {it.action: it.enabled for it in state.items() if it.action}


def test_all_up_and_this_mac_serving():
    st = MenubarState.from_status(sample_status(), url=URL, node_name="MAC-1.local.", service_installed=True)
    assert st.title() == "MoE 3/3"
    assert (st.node_state, st.node_groups, st.active_sessions) == ("up", [1], 1)
    titles = [it.title for it in st.items()]
    assert "Peers up: 3 of 3" in titles and "This Mac: group 1, up" in titles and "Active sessions: 1" in titles
    assert enabled(st) == {"start": False, "stop": True, "chat": True, "status_page": True}


def test_degraded_cluster_and_ignored_node():
    status = sample_status()
    status["peers"][0].update(state="ignored", reason="manifest hash differs")
    status["peers"][2]["state"] = "down"
    st = MenubarState.from_status(status, url=URL, node_name="mac-0", service_installed=True)
    assert st.title() == "MoE 1/3 ⚠"
    assert "This Mac: group 0, ignored (manifest hash differs)" in [it.title for it in st.items()]
    assert enabled(st)["stop"] is True  # the process runs, even if the router ignores it


def test_this_mac_not_a_peer_and_no_service():
    st = MenubarState.from_status(sample_status(), url=URL, node_name="laptop")
    assert st.node_state is None and not st.node_running
    titles = [it.title for it in st.items()]
    assert "This Mac: not serving a group" in titles
    assert "Start node (run `mlxmoe service install` first)" in titles
    assert enabled(st) == {"start": False, "stop": False, "chat": True, "status_page": True}
    st.service_installed = True
    assert enabled(st)["start"] is True


def test_advertised_names_and_several_nodes_on_one_mac():
    status = sample_status()
    names = ["studio-g0-7420", "air-g1-7420", "studio-g2-7421"]
    for p, name in zip(status["peers"], names):
        p["name"] = name
    status["peers"][0].update(state="down", reason="no answer")
    st = MenubarState.from_status(status, url=URL, node_name="Studio.local", service_installed=True)
    assert (st.node_state, st.node_groups, st.node_reason) == ("up", [0, 2], "no answer")
    assert "This Mac: group 0, 2, up (no answer)" in [it.title for it in st.items()]
    assert MenubarState.from_status(status, url=URL, node_name="stud").node_state is None


def test_router_unreachable():
    st = MenubarState.from_status(None, url="localhost:8000/v1", node_name="x", error="Connection refused")
    assert st.title() == "MoE –"
    titles = [it.title for it in st.items()]
    assert titles[:2] == ["Router not reachable at http://localhost:8000", "Connection refused"]
    assert enabled(st) == {"start": False, "stop": False, "chat": False, "status_page": False}


def test_empty_cluster():
    st = MenubarState.from_status({"peers": [], "sessions": []}, url=URL, node_name="x")
    assert st.title() == "MoE 0/0" and st.reachable


def test_print_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with FakeRouter() as srv:
        r = CliRunner().invoke(menubar_cmd, ["--print", "--url", srv.url, "--node-name", "mac-2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "MoE 3/3"
    assert "This Mac: group 2, up" in r.output and "[x] Open chat" in r.output and "[ ] Stop node" in r.output
    r = CliRunner().invoke(menubar_cmd, ["--print", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 0 and r.output.startswith("MoE –\n") and "Router not reachable" in r.output


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS message")
def test_plain_menubar_off_macos_says_why():
    with pytest.raises(MenubarUnavailable, match="needs macOS"):
        run_menubar(URL)
    r = CliRunner().invoke(menubar_cmd, [])
    assert r.exit_code == 1 and "needs macOS" in r.output and "mlxmoe menubar --print" in r.output
