"""The status page: pure render() checks, then the real thing in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlxmoe.ui.status_page import render
from ui_fake_server import FakeRouter, sample_status

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
EVIL = '<img src=x onerror="alert(1)"></script><script>alert(2)</script>'
EMPTY = {"model": "m", "manifest_hash": "h", "uptime_s": 1.0, "peers": [], "sessions": [], "last_placement": None,
         "counters": {"requests": 0, "failovers": 0, "rejected": 0}}


def evil_status():
    st = sample_status()
    st["peers"][2].update(state="ignored", reason="manifest hash differs", manifest_hash="other")
    st["peers"].append({"name": EVIL, "url": "http://x", "groups": [7], "manifest_hash": None, "protocol": 1,
                        "free_memory": None, "active_sessions": 0, "state": "down", "reason": "<b>gone</b>",
                        "backend": None})
    return st


def embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="initial-status">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_render_is_self_contained_and_embeds_status():
    page = render(sample_status())
    assert page.startswith("<!doctype html>")
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page), "no external assets"
    assert embedded(page)["peers"][0]["name"] == "mac-0"
    assert 'fetch("/status/public"' in page


def test_render_escapes_untrusted_text():
    st = evil_status()
    page = render(st)
    assert EVIL not in page and "<script>alert(2)" not in page and "<b>gone</b>" not in page
    # the script element closes exactly where we closed it
    assert page.count("</script>") == 2
    assert embedded(page)["peers"][-1]["name"] == EVIL  # data survives, escaped


def test_render_empty_cluster_and_odd_fields():
    assert "<title>m · mlxmoe status</title>" in render(EMPTY)
    render({})  # a router that sends almost nothing still gets a page
    render({"model": "<i>", "peers": [{"name": 3}], "last_placement": {"scores": {}}})


# --- headless Chromium ------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def chromium(tmp_path, *args) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}".*?(?=<div class="card|$)', dom, re.S)
    assert m, f"#{element_id} not rendered"
    return re.sub(r"<[^>]+>", " ", m.group(0))


@needs_chromium
def test_page_in_chromium(tmp_path):
    st = evil_status()
    with FakeRouter(status=st) as srv:
        dom = chromium(tmp_path, "--dump-dom", srv.url + "/")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status_page.png"
        shot.unlink(missing_ok=True)
        chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", srv.url + "/")
    assert shot.stat().st_size > 10_000
    body = dom[dom.index("<body"):dom.index("<noscript>")]
    peers = text_of(body, "peers")
    for name in ("mac-0", "mac-1", "mac-2"):
        assert name in peers
    assert re.findall(r'<span class="peer-groups">([^<]*)</span>', body) == ["0", "1", "2", "7"]
    assert "manifest hash differs" in peers and 'class="state ignored"' in body
    assert "40.0 GiB" in peers
    # the untrusted name is text, not markup
    assert "&lt;img src=x onerror=\"alert(1)\"&gt;&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in body
    assert "<img" not in body and "<b>gone" not in body
    # placement bars: one per group, widths from the scores, best one marked
    bars = re.findall(r'<div class="fill( best)?" data-group="(\d+)" style="width: ([\d.]+)%;">', body)
    assert [(g, float(w)) for _, g, w in bars] == [("0", 21.0), ("1", 64.0), ("2", 15.0)]
    assert [g for best, g, _ in bars if best] == ["1"]
    assert "margin 0.430" in body
    sessions = text_of(body, "sessions")
    assert st["sessions"][0]["id"] in sessions and "mac-1" in sessions and "group 1" in sessions
    assert "2/4 peers up" in body


@needs_chromium
def test_page_refreshes_from_status(tmp_path):
    # The page is rendered with the empty cluster; /status then answers with peers.
    with FakeRouter(status=sample_status(n_peers=2), index_status=EMPTY) as srv:
        dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", srv.url + "/")
        assert srv.status_fetches >= 1
    body = dom[dom.index("<body"):dom.index("<noscript>")]
    assert "mac-1" in body and "2/2 peers up" in body


@needs_chromium
def test_empty_cluster_in_chromium(tmp_path):
    page = tmp_path / "empty.html"
    page.write_text(render(EMPTY))
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    body = dom[dom.index("<body"):dom.index("<noscript>")]
    assert "No peers yet" in body and "No sessions yet" in body and "No session has been placed yet" in body
    assert "0/0 peers up" in body


def live_status():
    """sample_status with a chat generating now, one active and 12 kept ones."""
    st = sample_status()
    base = st["sessions"][0]
    now = __import__("time").time()
    kept = [{**base, "id": f"ref-kept{i:02d}", "generating": False, "active": False, "tok_s": None,
             "last_used": now - 600 - i} for i in range(12)]
    live = {**base, "id": "ref-streaming", "generating": True, "active": True, "turn_tokens": 40, "tok_s": 12.34,
            "turns": 3, "tokens": 95, "last_used": now}
    st["sessions"] = kept + [{**base, "generating": False, "active": True, "last_used": now - 5}, live]
    return st


def test_menubar_counts_as_the_page_does():
    from mlxmoe.ui.menubar import MenubarState
    st = MenubarState.from_status(live_status(), url="http://127.0.0.1:8000", node_name="mac-1")
    assert (st.active_sessions, st.kept_sessions, st.generating) == (2, 12, 1)
    titles = [it.title for it in st.items()]
    assert "Active sessions: 2" in titles and "Kept sessions: 12" in titles and "Generating now: 1" in titles


@needs_chromium
def test_generating_sessions_first_with_counts(tmp_path):
    st = live_status()
    with FakeRouter(status=st) as srv:
        dom = chromium(tmp_path, "--dump-dom", srv.url + "/")
        shot = ARTIFACTS / "status_page_live.png"
        ARTIFACTS.mkdir(exist_ok=True)
        shot.unlink(missing_ok=True)
        chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", srv.url + "/")
    assert shot.stat().st_size > 10_000
    body = dom[dom.index("<body"):dom.index("<noscript>")]
    sessions = text_of(body, "sessions")
    assert "Sessions: 2 active (1 generating) · 12 kept" in sessions
    ids = re.findall(r'<span class="mono session-id">([^<]*)</span>', body)
    assert ids[:2] == ["ref-streaming", st["sessions"][12]["id"]]  # in flight first, then the latest used
    assert len(ids) == 7 and "The 7 most recent shown; 7 more kept." in sessions  # 2 active + 5 kept
    assert "generating · 12.3 tok/s" in sessions and 'class="sstate kept"' in body
    assert body.index('id="sessions"') < body.index('id="peers"')  # above the fold
    assert 'href="/chat"' in body


def quality_status():
    """sample_status with layout nodes' expected quality on two of its peers (Router._peer_status)."""
    st = sample_status()
    st["peers"][0]["expected_quality"] = {"ppl_ratio": 1.0412, "worst_ppl_ratio": 1.0893, "agreement": 0.93}
    st["peers"][1]["expected_quality"] = {"ppl_ratio": 1.0, "worst_ppl_ratio": 1.0, "agreement": 1.0}
    return st


def test_render_embeds_expected_quality():
    page = render(quality_status())
    assert embedded(page)["peers"][0]["expected_quality"]["worst_ppl_ratio"] == 1.0893
    assert "Expected quality" in page and "worst \\u00d7" in page  # the renderer's column and its text


@needs_chromium
def test_peers_show_expected_quality_in_chromium(tmp_path):
    with FakeRouter(status=quality_status()) as srv:
        dom = chromium(tmp_path, "--dump-dom", srv.url + "/")
    body = dom[dom.index("<body"):dom.index("<noscript>")]
    shown = re.findall(r'<span class="quality[^"]*"[^>]*>([^<]*)</span>', body)
    assert shown == ["×1.04 (worst ×1.09)", "×1.00 (worst ×1.00)", "-"], shown
    assert "Expected quality" in text_of(body, "peers") and "greedy agreement 0.93" in body
