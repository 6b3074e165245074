"""The web chat page (/chat): render() checks, then a real chat in headless
Chromium against a LocalCluster of fake engines, with a screenshot."""

from __future__ import annotations

import html
import re
import struct
import zlib


from fakes import FakeEngine, FakeFrontend, LocalCluster, encode_chat, expected_text
from mlxmoe.ui.chat_page import render
from test_ui_status_page import ARTIFACTS, chromium, needs_chromium

MSG, MSG2 = "Tell me a joke.", "Another one?"
MAX_TOKENS = 48  # ?max_tokens=: a short answer ends well within Chromium's virtual-time budget, even on a busy CPU


def test_render_is_self_contained():
    page = render()
    assert page.startswith("<!doctype html>")
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page), "no external assets"
    assert page.count("<script>") == 1 and "fetch(\"/v1/chat/completions\"" in page
    assert "sessionStorage" in page and "localStorage" not in page  # the key lives for the tab only
    assert "innerHTML" not in page  # model text only through textContent
    for mode in ("pin", "onehop", "split", "race"):
        assert f'<option value="{mode}">' in page
    assert 'href="/"' in page  # back to the status page


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def png_colours(data: bytes) -> int:
    """Distinct byte values across the image data: a blank page has very few."""
    idat = b"".join(data[i + 8:i + 8 + struct.unpack(">I", data[i:i + 4])[0]]
                    for i in [m.start() - 4 for m in re.finditer(b"IDAT", data)])
    return len(set(zlib.decompress(idat)))


def by_class(dom: str, cls: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", m))
            for m in re.findall(rf'<div class="{cls}">(.*?)</div>', dom, re.S)]


@needs_chromium
def test_chat_in_chromium(tmp_path):
    fe = FakeFrontend(n_groups=3, fixed={0: 0.2, 1: 0.7, 2: 0.1})
    with LocalCluster([FakeEngine(group=g) for g in range(3)], fe, names=["mac-0", "mac-1", "mac-2"]) as c:
        url = (c.api_url + "/chat?q=" + MSG.replace(" ", "%20") + "&q=" + MSG2.replace(" ", "%20")
               + f"&max_tokens={MAX_TOKENS}")
        dom = chromium(tmp_path, "--virtual-time-budget=60000", "--dump-dom", url)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "chat_page.png"
        shot.unlink(missing_ok=True)
        chromium(tmp_path, "--virtual-time-budget=60000", f"--screenshot={shot}", "--window-size=1000,700", url)
        sessions = c.router.status()["sessions"]
    assert by_class(dom, "msg user") == [MSG, MSG2]
    first = [{"role": "user", "content": MSG}]
    answer = by_class(dom, "msg assistant")
    assert answer[0] == expected_text(encode_chat(first), MAX_TOKENS)
    second = first + [{"role": "assistant", "content": answer[0]}, {"role": "user", "content": MSG2}]
    assert answer[1] == expected_text(encode_chat(second), MAX_TOKENS)  # the whole conversation was sent
    meta = by_class(dom, "meta done")
    assert len(meta) == 2 and all("node mac-1" in m and "group 1" in m and "pin" in m for m in meta)
    assert all(f"{MAX_TOKENS} tokens" in m and re.search(r"[\d.]+ tok/s", m) for m in meta)
    # one session per Chromium run, both turns on it (the page sent its id back), placed on the best group
    assert len(sessions) == 2 and all(s["node"] == "mac-1" and s["turns"] == 2 and not s["api"] for s in sessions)
    data = shot.read_bytes()
    assert png_size(data) == (1000, 700) and png_colours(data) > 8 and len(data) > 5_000


@needs_chromium
def test_chat_error_is_shown(tmp_path):
    with LocalCluster([FakeEngine(group=0)], api_keys=["sekret"]) as c:
        dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", c.api_url + "/chat?q=hi")
    err = by_class(dom, "meta err")
    assert len(err) == 1 and "HTTP 401" in err[0] and "API key" in err[0]
    assert by_class(dom, "msg assistant") == [""]
