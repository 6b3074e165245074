"""A small Chrome DevTools Protocol client for tests that drive headless Chromium
(aiohttp's websocket client; no other dependency).

    async with Chromium(binary, tmp_path) as browser:
        page = await browser.new_page()
        await page.goto(url)
        await page.type("#input", "hello")
        await page.click("#send")
        await page.wait("document.querySelector('.meta.done')")

Every wait is bounded: a command times out after `timeout` seconds, `wait` after its own.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1200,900"]


class CdpError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium (its own profile under `tmp`) and the browser's DevTools socket."""

    def __init__(self, binary: str, tmp: Path, timeout: float = 20.0):
        self.binary, self.tmp, self.timeout = binary, Path(tmp), timeout
        self.errors: list[str] = []  # uncaught exceptions and console errors of every page
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.proc = self.http = self.ws = self._reader = None

    async def __aenter__(self) -> "Chromium":
        self.stderr = self.tmp / "chromium-stderr.log"
        with open(self.stderr, "wb") as err:  # a file, not a pipe: Chromium never blocks on a full pipe
            self.proc = subprocess.Popen([self.binary, *FLAGS, f"--user-data-dir={self.tmp / 'cdp-profile'}",
                                          "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        try:
            self.http = aiohttp.ClientSession()
            self.ws = await self.http.ws_connect(await self._ws_url(), max_msg_size=0)
            self._reader = asyncio.create_task(self._read())
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self._reader:
            self._reader.cancel()
        if self.ws:
            await self.ws.close()
        if self.http:
            await self.http.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc:  # its helpers (renderer, zygote) are in the group we started
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _ws_url(self) -> str:
        """The browser's socket, from "DevTools listening on ws://..." on stderr."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            text = self.stderr.read_text(errors="replace")
            m = re.search(r"DevTools listening on (ws://\S+)", text)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}: {text[-2000:]}")
            await asyncio.sleep(0.05)
        raise CdpError(f"no DevTools URL from chromium within {self.timeout} s")

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch(json.loads(msg.data))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CdpError("the DevTools socket closed"))

    def _dispatch(self, d: dict) -> None:
        if "id" in d:
            fut = self._pending.get(d["id"])
            if fut and not fut.done():
                if "error" in d:
                    fut.set_exception(CdpError(f"{d['error'].get('message')}: {d['error'].get('data', '')}"))
                else:
                    fut.set_result(d.get("result", {}))
        elif d.get("method") == "Runtime.exceptionThrown":
            ex = d["params"]["exceptionDetails"]
            self.errors.append((ex.get("exception") or {}).get("description") or ex.get("text", "exception"))
        elif d.get("method") == "Runtime.consoleAPICalled" and d["params"].get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in d["params"]["args"]))

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = next(self._ids)
        fut = self._pending[i] = asyncio.get_running_loop().create_future()
        msg = {"id": i, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            await self.ws.send_str(json.dumps(msg))
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            self._pending.pop(i, None)

    async def new_page(self) -> "Page":
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        s = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, s["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page


class Page:
    """One tab: navigate, evaluate, click and type as a user does (real input events)."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    async def send(self, method: str, params: dict | None = None) -> dict:
        return await self.browser.send(method, params, self.session)

    async def goto(self, url: str, timeout: float = 15.0) -> None:
        r = await self.send("Page.navigate", {"url": url})
        if r.get("errorText"):
            raise CdpError(f"{url}: {r['errorText']}")
        await self.wait("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    async def eval(self, expression: str):
        """The expression's value (JSON-able; promises awaited); a page exception raises CdpError."""
        r = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True})
        if "exceptionDetails" in r:
            ex = r["exceptionDetails"]
            raise CdpError((ex.get("exception") or {}).get("description") or ex.get("text"))
        return r["result"].get("value")

    async def wait(self, expression: str, timeout: float = 15.0, every: float = 0.05):
        """Poll until the expression is truthy; its value. Past `timeout`: AssertionError with the last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {expression!r} (last value "
                                     f"{value!r}; page errors {self.browser.errors})")
            await asyncio.sleep(every)

    async def click(self, selector: str) -> None:
        """A mouse click at the element's centre: a hidden or covered element fails as it would for a user."""
        js = f"""(function () {{
          var e = document.querySelector({json.dumps(selector)});
          if (!e) return "missing";
          e.scrollIntoView({{block: "center"}});
          var r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
          var hit = document.elementFromPoint(x, y);
          return r.width && r.height && hit && (e === hit || e.contains(hit)) ? [x, y] : "hidden or covered";
        }})()"""
        at = await self.eval(js)
        if not isinstance(at, list):
            raise AssertionError(f"cannot click {selector}: {at}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": at[0], "y": at[1], "button": "left",
                                                         "clickCount": 0 if kind == "mouseMoved" else 1})

    async def type(self, selector: str, text: str) -> None:
        """Click into the field, then type (Input.insertText: input events as from a keyboard)."""
        await self.click(selector)
        await self.send("Input.insertText", {"text": text})

    async def screenshot(self, path: Path) -> None:
        """The viewport as a PNG."""
        Path(path).write_bytes(base64.b64decode((await self.send("Page.captureScreenshot", {"format": "png"}))["data"]))

    async def press(self, key: str, code: int) -> None:
        """A key press on the focused element, e.g. press("Enter", 13)."""
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                       "windowsVirtualKeyCode": code})
