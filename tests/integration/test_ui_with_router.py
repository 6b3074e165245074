"""The UI against the real router (mlxmoe.cluster) serving fake engines: the
contract between them, not just against our own fake."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import fakes
import pytest

from mlxmoe.ui import fetch_status
from mlxmoe.ui.chat import Conversation, status_summary
from mlxmoe.ui.doctor import check_cluster
from mlxmoe.ui.menubar import MenubarState

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def cluster():
    with fakes.LocalCluster([fakes.FakeEngine(group=g, max_context=4096) for g in range(3)]) as c:
        end = time.time() + 20
        while time.time() < end and sum(p["state"] == "up" for p in fetch_status(c.api_url)["peers"]) < 3:
            time.sleep(0.1)
        yield c


def ask(conv, text):
    async def go():
        async with aiohttp.ClientSession() as http:
            return await conv.ask(http, text)
    return asyncio.run(go())


def test_chat_is_pinned_and_reports_where(cluster):
    conv = Conversation(cluster.api_url + "/v1")
    answer, stats = ask(conv, "topic1 say something")
    assert answer and stats.tokens > 0 and stats.ttft_s is not None
    assert stats.node and stats.group is not None and stats.margin is not None and stats.scores
    assert conv.session_id == stats.session
    _, again = ask(conv, "and more")
    assert (again.node, again.group) == (stats.node, stats.group)  # the conversation stays pinned

    status = fetch_status(cluster.api_url)
    lines = status_summary(status, conv.session_id)
    assert lines[0].startswith("fake-moe · 3/3 peers up")
    assert f"pinned to {stats.node} (group {stats.group})" in lines[-1]


def test_menubar_and_doctor_read_the_real_status(cluster):
    status = fetch_status(cluster.api_url)
    me = status["peers"][0]["name"]
    st = MenubarState.from_status(status, url=cluster.api_url, node_name=me)
    assert st.title() == "MoE 3/3" and st.node_state == "up" and st.node_groups == status["peers"][0]["groups"]
    checks, _ = check_cluster(cluster.api_url)
    assert [c.status for c in checks] == ["ok", "ok"]


def test_status_page_served_by_router(cluster):
    import urllib.request
    with urllib.request.urlopen(cluster.api_url + "/") as r:
        page = r.read().decode()
    assert 'id="initial-status"' in page and 'fetch("/status/public"' in page


def test_status_page_in_chromium_with_real_status(cluster, tmp_path):
    from test_ui_status_page import CHROMIUM, chromium
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    ask(Conversation(cluster.api_url), "topic2 hello")  # so there is a placement to draw
    status = fetch_status(cluster.api_url)
    dom = chromium(tmp_path, "--dump-dom", cluster.api_url + "/")
    body = dom[dom.index("<body"):dom.index("<noscript>")]
    for p in status["peers"]:
        assert f'<span class="peer-name">{p["name"]}</span>' in body
    bars = re.findall(r'class="fill( best)?" data-group="(\d+)"', body)
    assert [g for _, g in bars] == ["0", "1", "2"]
    assert [g for best, g in bars if best] == [str(status["last_placement"]["best"])]
    assert "3/3 peers up" in body
