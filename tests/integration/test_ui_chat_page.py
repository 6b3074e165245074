"""The web chat page (/chat): render() checks; a chat in headless Chromium
against a LocalCluster of fake engines, with a screenshot; then the page driven
over the DevTools protocol (tests/cdp.py) as a user drives it: typing, Send and
Stop, the system prompt, markdown, history across reloads, chats switched and
deleted."""

from __future__ import annotations

import asyncio
import html
import json
import re
import struct
import urllib.request
import zlib

from cdp import Chromium
from fakes import FakeEngine, FakeFrontend, LocalCluster, encode_chat, expected_text
from mlxmoe.ui.chat_page import render
from test_ui_status_page import ARTIFACTS, CHROMIUM, chromium, needs_chromium

MSG, MSG2 = "Tell me a joke.", "Another one?"
MAX_TOKENS = 48  # ?max_tokens=: a short answer ends well within Chromium's virtual-time budget, even on a busy CPU


def test_render_is_self_contained():
    page = render()
    assert page.startswith("<!doctype html>")
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page), "no external assets"
    assert page.count("<script>") == 1 and "fetch(\"/v1/chat/completions\"" in page
    # the API key lives for the tab only: written to sessionStorage, and localStorage is only ever given
    # the chats, the current chat's id and the default system prompt (the Chromium test checks the values too)
    assert 'KEY = "mlxmoe-key"' in page and "sessionStorage.setItem(KEY," in page
    assert page.count("localStorage.setItem(") == 1 and "localStorage.setItem(k, v)" in page  # in store() only
    assert set(re.findall(r"(?<!function )\bstore\((\w+)", page)) == {"CHATS", "CURRENT", "SYSTEM"}
    assert "stream_options: {include_usage: true}" in page
    assert '<link rel="icon" href="data:image/svg+xml,' in page
    for markup in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert markup not in page  # model text only through textContent
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


def test_favicon_is_not_a_404():
    with LocalCluster([FakeEngine(group=0)], api_keys=["sekret"]) as c:  # no key needed for the icon
        r = urllib.request.urlopen(c.api_url + "/favicon.ico", timeout=10)
        assert r.status == 204 and r.read() == b""


# --- the page driven over the DevTools protocol ------------------------------

SYSTEM = "You answer in one line."
MD = """# Plan

Use **bold**, *italic* and `inline code` for a €5 fee — done.

```python
def add(a, b):
    return a + b  # <b>not markup</b>
```

- one
- two
  - nested

1. first
2. second

[safe](https://example.com/a) and [bad](javascript:void0) and <img src=x onerror=alert(1)>
"""
MD_TOKENS = len(MD.encode())  # byte tokens: more than the chunks the stream has (€ and — are one chunk each)


class ScriptedEngine(FakeEngine):
    """A FakeEngine whose every answer is `text` (then spaces), detokenized as SentencePiece does (no
    half characters): markdown in, DOM out."""

    def __init__(self, text: str, **kw):
        super().__init__(spm=True, **kw)
        data = text.encode()

        def next_token(ctx: list[int]) -> int:
            i = len(ctx) - bytes(t & 0xFF for t in ctx).rfind(b"<assistant>") - len(b"<assistant>")
            return data[i] if i < len(data) else 32

        self.next_token = next_token


def js(expr: str, *args) -> str:
    """`expr` with its {} filled by JSON values (strings quoted for JS)."""
    return expr.format(*(json.dumps(a) for a in args))


ANSWERS = "Array.from(document.querySelectorAll('#log .msg.assistant'), e => e.textContent)"
USERS = "Array.from(document.querySelectorAll('#log .msg.user'), e => e.textContent)"
METAS = "Array.from(document.querySelectorAll('#log .meta'), e => e.className + ': ' + e.textContent)"
SEND = "document.getElementById('send').textContent"
STORED = "JSON.parse(localStorage.getItem('mlxmoe-chats') || '[]')"


async def send(page, text: str, done: int) -> str:
    """Type `text`, click Send, wait for the `done`-th finished answer; its text."""
    await page.type("#input", text)
    await page.click("#send")
    await page.wait(f"document.querySelectorAll('#log .meta.done').length >= {done} && {SEND} === 'Send'", 20)
    return (await page.eval(ANSWERS))[-1]


def run_page(tmp_path, scenario, timeout: float = 90.0):
    async def main():
        async with Chromium(CHROMIUM, tmp_path) as browser:
            await asyncio.wait_for(scenario(await browser.new_page()), timeout)
            assert browser.errors == []  # no uncaught exception, no console error (a user's stop included)
    asyncio.run(main())


@needs_chromium
def test_chat_driven_stop_system_prompt_and_reload(tmp_path):
    msg1, msg2, msg3 = "Tell me a joke.", "A longer one, please.", "And now?"
    system = [{"role": "system", "content": SYSTEM}]
    with LocalCluster([FakeEngine(group=0, n_groups=1, delay=0.02)], api_keys=["sekret"]) as c:
        base = c.api_url + "/chat?max_tokens="

        async def scenario(page):
            await page.goto(base + "12")
            await page.type("#key", "sekret")
            await page.click("#sys summary")  # collapsed until opened
            await page.type("#system", SYSTEM)
            # the system prompt went first in the request: the fake's answer is a function of the whole prompt
            first = system + [{"role": "user", "content": msg1}]
            a1 = await send(page, msg1, 1)
            assert a1 == expected_text(encode_chat(first), 12) != expected_text(encode_chat(first[1:]), 12)
            meta = (await page.eval(METAS))[0]
            assert meta.startswith("meta done: ") and "12 tokens" in meta and re.search(r"[\d.]+ tok/s", meta)

            # a reload restores the chat, its system prompt and the key (the tab's sessionStorage)
            await page.goto(base + "400")
            assert await page.wait(f"{USERS}.length === 1 && {ANSWERS}[0]") == a1
            assert await page.eval("document.getElementById('system').value") == SYSTEM
            assert SYSTEM in await page.eval("document.getElementById('sys').textContent")
            assert await page.eval("document.getElementById('key').value") == "sekret"

            # Stop mid-answer: the stream ends, the partial answer stays, marked stopped, no error
            await page.type("#input", msg2)
            await page.press("Enter", 13)
            await page.wait(f"{SEND} === 'Stop' && {ANSWERS}.length === 2 && {ANSWERS}[1].length >= 15")
            await page.click("#send")
            await page.wait(f"{SEND} === 'Send'", 5)
            partial = (await page.eval(ANSWERS))[1]
            await asyncio.sleep(0.5)
            assert (await page.eval(ANSWERS))[1] == partial  # nothing more arrived
            second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": msg2}]
            full = expected_text(encode_chat(second), 400)
            assert 15 <= len(partial) < len(full) and full.startswith(partial)
            meta = (await page.eval(METAS))[1]
            assert meta.startswith("meta stopped: stopped") and not await page.eval("!!document.querySelector('.err')")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(ARTIFACTS / "chat_page_stopped.png")
            assert (await page.eval(STORED))[0]["messages"][-1] == {"role": "assistant", "content": partial,
                                                                   "stopped": True, "meta": meta[14:]}

            # after a reload (stopped answer still marked), the next turn carries the partial answer
            await page.goto(base + "12")
            await page.wait(f"{ANSWERS}.length === 2")
            assert (await page.eval(METAS))[1] == meta
            a3 = await send(page, msg3, 2)
            third = second[:-1] + [{"role": "user", "content": msg2}, {"role": "assistant", "content": partial},
                                   {"role": "user", "content": msg3}]
            assert a3 == expected_text(encode_chat(third), 12)

            # the key is in the tab's sessionStorage, nowhere in localStorage
            assert await page.eval("sessionStorage.getItem('mlxmoe-key')") == "sekret"
            stored = await page.eval("JSON.stringify(Object.assign({}, localStorage))")
            assert "sekret" not in stored and SYSTEM in stored
            return None

        run_page(tmp_path, scenario)
        sessions = c.router.status()["sessions"]
    assert len(sessions) == 1  # every turn, the stopped one too, on the chat's one session


@needs_chromium
def test_markdown_and_chat_history(tmp_path):
    with LocalCluster([ScriptedEngine(MD, group=0, n_groups=1, delay=0.02)]) as c:
        url = c.api_url + f"/chat?max_tokens={MD_TOKENS}"

        async def scenario(page):
            await page.goto(url)
            await page.type("#input", "Show me a plan")
            await page.click("#send")
            # rendered while it streams: the code block is there before the answer ends
            await page.wait(f"!!document.querySelector('#log pre code') && {SEND} === 'Stop'")
            await page.wait("!!document.querySelector('#log .meta.done')", 20)
            md = await page.eval("""(function () {
              var log = document.getElementById('log'), q = s => Array.from(log.querySelectorAll(s));
              var t = s => q(s).map(e => e.textContent);
              return {h1: t('.msg h1'), strong: t('strong'), em: t('em'), inline: t('p > code'),
                      pre: t('pre > code'), lang: t('.code .lang'), cls: q('pre > code').map(e => e.className),
                      copy: t('.code button.copy'), ul: t('.msg > ul > li'), nested: t('ul ul > li'),
                      ol: t('ol > li'), links: q('a').map(a => [a.textContent, a.getAttribute('href'), a.rel, a.target]),
                      img: q('img').length + q('b').length, last: t('.msg > p').pop(),
                      meta: t('.meta.done')[0]};
            })()""")
            assert md["h1"] == ["Plan"] and md["strong"] == ["bold"] and md["em"] == ["italic"]
            assert md["inline"] == ["inline code"]
            assert md["pre"] == ["def add(a, b):\n    return a + b  # <b>not markup</b>"]
            assert md["lang"] == ["python"] and md["cls"] == ["language-python"] and md["copy"] == ["Copy"]
            assert md["ul"][0] == "one" and md["ul"][1].startswith("two") and md["nested"] == ["nested"]
            assert md["ol"] == ["first", "second"]
            assert md["links"] == [["safe", "https://example.com/a", "noopener noreferrer", "_blank"]]
            assert md["img"] == 0 and md["last"] == "safe and bad and <img src=x onerror=alert(1)>"
            assert f"{MD_TOKENS} tokens" in md["meta"]  # the usage chunk's count, not the chunks'
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(ARTIFACTS / "chat_page_markdown.png")
            await page.browser.send("Browser.grantPermissions", {"permissions": ["clipboardReadWrite"]})
            await page.click(".code button.copy")
            assert await page.wait("document.querySelector('.code button.copy').textContent !== 'Copy' && "
                                   "document.querySelector('.code button.copy').textContent") == "Copied"
            assert await page.eval("navigator.clipboard.readText()") == md["pre"][0]

            # New chat: an empty log, a new session id; the first chat listed below it
            old = (await page.eval(STORED))[0]
            await page.click("#new")
            await page.wait(f"{USERS}.length === 0 && document.querySelectorAll('#chats li').length === 2")
            await send(page, "Second question", 1)
            titles = "Array.from(document.querySelectorAll('#chats .open'), e => e.textContent)"
            assert await page.eval(titles) == ["Second question", "Show me a plan"]
            stored = await page.eval(STORED)
            assert [s["id"] for s in stored][1] == old["id"] and stored[0]["session"] != old["session"]

            # switch back to the first chat, delete the second, and a reload restores the first
            await page.click("#chats li:nth-child(2) .open")
            await page.wait(js(f"{USERS}[0] === {{}} && !!document.querySelector('#log pre code')", "Show me a plan"))
            assert await page.eval("document.querySelector('#chats li.current .open').textContent") == "Show me a plan"
            await page.click("#chats li:nth-child(1) .del")
            await page.wait("document.querySelectorAll('#chats li').length === 1")
            assert [s["id"] for s in await page.eval(STORED)] == [old["id"]]
            await page.send("Page.reload")
            await page.wait(js(f"{USERS}.length === 1 && {USERS}[0] === {{}} && "
                               "!!document.querySelector('#log pre code')", "Show me a plan"))
            assert await page.eval("document.querySelectorAll('#log .meta.done').length") == 1
            assert await page.eval("document.querySelector('#chats li.current .open').textContent") == "Show me a plan"

        run_page(tmp_path, scenario)
