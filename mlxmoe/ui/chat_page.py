"""The router's web chat page (`GET /chat`).

`render()` returns one self-contained HTML document (inline CSS and script,
no external assets: a LAN may have no internet). The script keeps the
conversation client-side, streams each answer from /v1/chat/completions with
fetch() and parses the SSE itself, and sends a session id (`X-Mlxmoe-Session`:
its own at first, then the one the router answers with) with each turn, so
every turn stays on one node.
Under each answer: node, group, mode (the router's X-MLXMoE-* headers) and
tok/s. An API key, when the router needs one, is kept in sessionStorage only.
`?q=TEXT` sends TEXT once the page loads, `?q=A&q=B` two turns, `&max_tokens=N` caps each answer (scripts and the
Chromium test).

Model text only reaches the DOM through `textContent`.
"""

from __future__ import annotations

from mlxmoe.modes import ROUTER_MODES

CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --bg:#f5f5f7; --card:#fff; --line:#e5e5ea; --me:#0a84ff; --err:#cf222e; }
@media (prefers-color-scheme: dark) { :root { --fg:#f5f5f7; --muted:#98989d; --bg:#1c1c1e; --card:#2c2c2e; --line:#3a3a3c; } }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", sans-serif; color:var(--fg);
       background:var(--bg); display:flex; flex-direction:column; height:100vh; }
header { display:flex; gap:12px; align-items:center; padding:10px 16px; border-bottom:1px solid var(--line);
         background:var(--card); flex-wrap:wrap; }
header h1 { font-size:16px; margin:0 8px 0 0; } header a { color:var(--me); }
label { color:var(--muted); font-size:13px; } select, input { font:inherit; font-size:13px; }
#log { flex:1; overflow-y:auto; padding:16px; }
.msg { max-width:820px; margin:0 auto 12px; padding:10px 14px; border-radius:10px; white-space:pre-wrap;
       background:var(--card); border:1px solid var(--line); }
.msg.user { border-left:3px solid var(--me); } .msg.assistant { border-left:3px solid #30a46c; }
.meta { max-width:820px; margin:-8px auto 14px; color:var(--muted); font-size:12px; }
.err { color:var(--err); }
form { display:flex; gap:8px; padding:12px 16px; border-top:1px solid var(--line); background:var(--card); }
textarea { flex:1; font:inherit; padding:8px; border-radius:8px; border:1px solid var(--line); resize:vertical;
           min-height:44px; background:var(--bg); color:var(--fg); }
button { font:inherit; padding:8px 16px; border-radius:8px; border:0; background:var(--me); color:#fff; }
button:disabled { opacity:.5; }
"""

JS = r"""
(function () {
  // our own id from the first turn (as `mlxmoe chat` does): a chat with an id is kept 30 min, not 2
  function newId() { return "web-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12); }
  var messages = [], session = newId(), busy = false;
  var maxTokens = parseInt(new URLSearchParams(location.search).get("max_tokens") || "", 10) || null;
  var log = document.getElementById("log"), input = document.getElementById("input");
  var send = document.getElementById("send"), mode = document.getElementById("mode");
  var keyField = document.getElementById("key");
  keyField.value = sessionStorage.getItem("mlxmoe-key") || "";
  keyField.addEventListener("change", function () { sessionStorage.setItem("mlxmoe-key", keyField.value.trim()); });

  function add(cls, text) {
    var d = document.createElement("div");
    d.className = cls; d.textContent = text; log.appendChild(d); log.scrollTop = log.scrollHeight;
    return d;
  }
  function headers() {
    var h = {"Content-Type": "application/json"};
    var k = keyField.value.trim();
    if (k) h["Authorization"] = "Bearer " + k;
    if (session) h["X-Mlxmoe-Session"] = session;
    if (mode.value) h["X-Mlxmoe-Mode"] = mode.value;
    return h;
  }
  function meta(el, r, n, t0, tFirst, tEnd) {
    var parts = [];
    var node = r.headers.get("X-MLXMoE-Node"), group = r.headers.get("X-MLXMoE-Group");
    var m = r.headers.get("X-MLXMoE-Mode");
    if (node) parts.push("node " + node);
    if (group && group !== "None") parts.push("group " + group);
    if (m) parts.push(m);
    parts.push(n + " tokens");
    if (tFirst) parts.push("first token " + ((tFirst - t0) / 1000).toFixed(2) + " s");
    // decode rate after the first token; when the tokens came in one read, over the whole answer
    var rate = n > 1 && tEnd - tFirst > 50 ? 1000 * (n - 1) / (tEnd - tFirst) : tEnd > t0 ? 1000 * n / (tEnd - t0) : null;
    if (tFirst && rate) parts.push(rate.toFixed(1) + " tok/s");
    el.textContent = parts.join(" \u00b7 ");
  }
  async function readStream(r, onData) {
    var reader = r.body.getReader(), dec = new TextDecoder(), buf = "";
    for (;;) {
      var x = await reader.read();
      if (x.done) break;
      buf += dec.decode(x.value, {stream: true});
      var events = buf.split(/\r?\n\r?\n/);
      buf = events.pop();
      events.forEach(function (ev) {
        var data = ev.split(/\r?\n/).filter(function (l) { return l.indexOf("data:") === 0; })
          .map(function (l) { return l.slice(5).trim(); }).join("\n");
        if (data && data !== "[DONE]") onData(JSON.parse(data));
      });
    }
  }
  async function ask(text) {
    if (busy || !text.trim()) return;
    busy = true; send.disabled = true;
    messages.push({role: "user", content: text});
    add("msg user", text);
    var out = add("msg assistant", ""), info = add("meta", "waiting for the first token\u2026");
    var reply = "", n = 0, t0 = performance.now(), tFirst = null, r;
    try {
      r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
        body: JSON.stringify(Object.assign({messages: messages, stream: true}, maxTokens ? {max_tokens: maxTokens} : {}))});
      if (!r.ok) {
        var e = await r.json().catch(function () { return {}; });
        throw new Error("HTTP " + r.status + ": " + ((e.error && e.error.message) || r.statusText));
      }
      session = r.headers.get("X-MLXMoE-Session") || session;
      await readStream(r, function (obj) {
        if (obj.error) throw new Error(obj.error.message || "error");
        var c = obj.choices && obj.choices[0], piece = c && c.delta && c.delta.content;
        if (piece) {
          if (tFirst === null) tFirst = performance.now();
          n++; reply += piece; out.textContent = reply;
          meta(info, r, n, t0, tFirst, performance.now());
          log.scrollTop = log.scrollHeight;
        }
      });
      messages.push({role: "assistant", content: reply});
      meta(info, r, n, t0, tFirst, performance.now());
      info.classList.add("done");
    } catch (err) {
      messages.pop();  // the turn did not happen: the next try resends it
      info.className = "meta err"; info.textContent = String(err.message || err);
    } finally {
      busy = false; send.disabled = false; input.focus();
    }
  }
  document.getElementById("form").addEventListener("submit", function (ev) {
    ev.preventDefault(); var t = input.value; input.value = ""; ask(t);
  });
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); document.getElementById("form").requestSubmit(); }
  });
  document.getElementById("new").addEventListener("click", function () {
    messages = []; session = newId(); log.replaceChildren();
  });
  fetch("/v1/models", {headers: headers()}).then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
    if (j && j.data && j.data[0]) document.getElementById("model").textContent = j.data[0].id;
  }).catch(function () {});
  (async function () {  // ?q=...: send each on load, one turn after another (scripts, tests)
    var qs = new URLSearchParams(location.search).getAll("q");
    for (var i = 0; i < qs.length; i++) await ask(qs[i]);
  })();
})();
"""


def render() -> str:
    modes = "".join(f'<option value="{m}">{m}</option>' for m in ROUTER_MODES)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlxmoe chat</title>
<style>{CSS}</style></head>
<body>
<header><h1 id="model">mlxmoe</h1>
<label>Mode <select id="mode"><option value="">router default</option>{modes}</select></label>
<label>API key <input id="key" type="password" placeholder="if the router needs one" size="18"></label>
<button id="new" type="button">New chat</button>
<a href="/">status</a></header>
<div id="log"></div>
<form id="form"><textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line)" autofocus></textarea>
<button id="send" type="submit">Send</button></form>
<script>{JS}</script>
</body></html>
"""
