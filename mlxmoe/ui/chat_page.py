"""The router's web chat page (`GET /chat`).

`render()` returns one self-contained HTML document (inline CSS and script, an
inline SVG favicon, no external assets: a LAN may have no internet). The
script:

- streams each answer from /v1/chat/completions with fetch() and parses the SSE
  itself; while it streams, Send becomes Stop, which aborts the fetch: the
  partial answer stays, marked as stopped, and is part of the next turn;
- sends the chat's system prompt (a collapsible field) as the first message of
  every request of that chat;
- renders answers as markdown (paragraphs, headings, emphasis, inline code,
  fenced code blocks with a Copy button, lists, quotes, tables, http(s) links)
  with its own small renderer, re-rendering the message on each read;
- keeps conversations (messages, session id, system prompt, mode) in
  localStorage: a reload restores the current chat, the sidebar lists earlier
  ones to switch back to or delete, and "New chat" starts one with a new id;
- sends a session id (`X-Mlxmoe-Session`: its own at first, then the one the
  router answers with) with each turn, so every turn stays on one node.

Under each answer: node, group, mode (the router's X-MLXMoE-* headers), the
token count (the final usage chunk's `completion_tokens`, asked for with
`stream_options.include_usage`; the number of chunks if none came) and tok/s.
An API key, when the router needs one, is kept in sessionStorage only, never in
localStorage. `?q=TEXT` starts a new chat and sends TEXT once the page loads,
`?q=A&q=B` two turns, `&max_tokens=N` caps each answer (scripts and the
Chromium tests).

Model text only reaches the DOM as text: the markdown renderer builds elements
with createElement and fills them with textContent, and only http(s) URLs
become links.
"""

from __future__ import annotations

from urllib.parse import quote

from mlxmoe.modes import ROUTER_MODES

# three dots in a speech-bubble blue; a data: URL, so the page needs no other request
FAVICON = ("<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'><rect width='32' height='32' rx='7' "
           "fill='#0a84ff'/><circle cx='9' cy='16' r='3' fill='#fff'/><circle cx='16' cy='16' r='3' fill='#fff'/>"
           "<circle cx='23' cy='16' r='3' fill='#fff'/></svg>")

CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --bg:#f5f5f7; --card:#fff; --line:#e5e5ea; --me:#0a84ff; --err:#cf222e;
        --code:#f0f0f3; --mono:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
@media (prefers-color-scheme: dark) { :root { --fg:#f5f5f7; --muted:#98989d; --bg:#1c1c1e; --card:#2c2c2e;
                                             --line:#3a3a3c; --code:#232325; } }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", sans-serif; color:var(--fg);
       background:var(--bg); display:flex; flex-direction:column; height:100vh; }
header { display:flex; gap:12px; align-items:center; padding:10px 16px; border-bottom:1px solid var(--line);
         background:var(--card); flex-wrap:wrap; }
header h1 { font-size:16px; margin:0 8px 0 0; } header a { color:var(--me); }
label { color:var(--muted); font-size:13px; } select, input { font:inherit; font-size:13px; }
#main { flex:1; display:flex; min-height:0; }
aside { width:230px; flex:none; padding:10px; overflow-y:auto; background:var(--card); border-right:1px solid var(--line); }
#new { width:100%; }
#chats { list-style:none; margin:10px 0 0; padding:0; }
#chats li { display:flex; border-radius:6px; } #chats li.current { background:var(--bg); }
#chats button { background:none; color:var(--fg); padding:6px 8px; border-radius:6px; }
#chats .open { flex:1; min-width:0; text-align:left; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
#chats .del { color:var(--muted); }
#chat { flex:1; min-width:0; display:flex; flex-direction:column; }
#sys { padding:6px 16px; border-bottom:1px solid var(--line); font-size:13px; color:var(--muted); }
#sys summary { cursor:pointer; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
#system { width:100%; margin-top:6px; min-height:60px; }
#log { flex:1; overflow-y:auto; padding:16px; }
.msg { max-width:820px; margin:0 auto 12px; padding:10px 14px; border-radius:10px; white-space:pre-wrap;
       background:var(--card); border:1px solid var(--line); overflow-wrap:anywhere; }
.msg.user { border-left:3px solid var(--me); } .msg.assistant { border-left:3px solid #30a46c; }
.msg > :first-child { margin-top:0; } .msg > :last-child { margin-bottom:0; }
.msg p, .msg ul, .msg ol, .msg blockquote, .msg table, .msg hr, .code { margin:0 0 10px; }
.msg h1, .msg h2, .msg h3, .msg h4, .msg h5, .msg h6 { margin:14px 0 6px; line-height:1.3; font-size:15px; }
.msg h1 { font-size:20px; } .msg h2 { font-size:18px; } .msg h3 { font-size:16px; }
.msg ul, .msg ol { padding-left:24px; } .msg li > ul, .msg li > ol { margin:0; }
.msg a { color:var(--me); } .msg hr { border:0; border-top:1px solid var(--line); }
.msg blockquote { padding-left:10px; border-left:3px solid var(--line); color:var(--muted); }
.msg table { border-collapse:collapse; display:block; overflow-x:auto; white-space:normal; }
.msg th, .msg td { border:1px solid var(--line); padding:4px 8px; }
.msg code { font:13px/1.45 var(--mono); background:var(--code); padding:1px 4px; border-radius:4px; }
.code { border:1px solid var(--line); border-radius:8px; overflow:hidden; white-space:normal; }
.code-bar { display:flex; justify-content:space-between; align-items:center; padding:2px 4px 2px 10px;
            font-size:12px; color:var(--muted); background:var(--bg); }
.code pre { margin:0; padding:10px; overflow-x:auto; background:var(--code); }
.code pre code { display:block; padding:0; white-space:pre; background:none; }
button.copy { padding:2px 8px; font-size:12px; background:none; color:var(--me); }
.meta { max-width:820px; margin:-8px auto 14px; color:var(--muted); font-size:12px; }
.err { color:var(--err); } .meta.stopped { font-style:italic; }
form { display:flex; gap:8px; padding:12px 16px; border-top:1px solid var(--line); background:var(--card); }
textarea { flex:1; font:inherit; padding:8px; border-radius:8px; border:1px solid var(--line); resize:vertical;
           min-height:44px; background:var(--bg); color:var(--fg); }
button { font:inherit; padding:8px 16px; border-radius:8px; border:0; background:var(--me); color:#fff; cursor:pointer; }
button:disabled { opacity:.5; } button.stop { background:var(--err); }
@media (max-width: 700px) { #main { flex-direction:column; }
  aside { width:auto; max-height:25vh; border-right:0; border-bottom:1px solid var(--line); } }
"""

JS = r"""
(function () {
  "use strict";
  // localStorage holds chats and the default system prompt; the API key (KEY) only ever goes to sessionStorage
  var CHATS = "mlxmoe-chats", CURRENT = "mlxmoe-current", SYSTEM = "mlxmoe-system", KEY = "mlxmoe-key";
  var MAX_CHATS = 30;
  var params = new URLSearchParams(location.search);
  var maxTokens = parseInt(params.get("max_tokens") || "", 10) || null;
  function $(id) { return document.getElementById(id); }
  var log = $("log"), input = $("input"), send = $("send"), mode = $("mode"), keyField = $("key");
  var system = $("system"), sysHint = $("sys-hint"), list = $("chats");
  function stored(k) { try { return localStorage.getItem(k); } catch (e) { return null; } }  // storage may be off
  function store(k, v) { try { localStorage.setItem(k, v); return true; } catch (e) { return false; } }  // or full
  var chats = load(), chat = null, run = null;  // run: the answer streaming now ({chat, ctl, stopped})
  keyField.value = sessionStorage.getItem(KEY) || "";
  keyField.addEventListener("change", function () { sessionStorage.setItem(KEY, keyField.value.trim()); });

  // ---- chats in localStorage
  // our own id from the first turn (as `mlxmoe chat` does): a chat with an id is kept 30 min, not 2
  function newId() { return "web-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12); }
  function fresh() {
    return {id: newId(), session: newId(), system: stored(SYSTEM) || "", mode: mode.value,
            messages: [], updated: Date.now()};
  }
  function load() {
    try {
      var v = JSON.parse(stored(CHATS) || "[]");
      return Array.isArray(v) ? v.filter(function (c) { return c && typeof c.id === "string" && Array.isArray(c.messages); }) : [];
    } catch (e) { return []; }
  }
  function byNewest(a, b) { return (b.updated || 0) - (a.updated || 0); }
  function save() {
    // chats with messages only, newest first; a full quota drops the oldest until the rest fits
    var keep = chats.filter(function (c) { return c.messages.length; }).sort(byNewest).slice(0, MAX_CHATS);
    chats = keep.indexOf(chat) < 0 ? [chat].concat(keep) : keep;
    for (var n = keep.length; n >= 0 && !store(CHATS, JSON.stringify(keep.slice(0, n))); n--) { /* quota */ }
    store(CURRENT, chat.id);
  }
  function title(c) {
    var first = c.messages.filter(function (m) { return m.role === "user"; })[0];
    return first ? first.content.replace(/\s+/g, " ").trim().slice(0, 60) || "(blank)" : "New chat";
  }
  function repair(c) {
    // a user turn with no answer (the page was closed before one came): back to the input box
    var last = c.messages[c.messages.length - 1];
    if (last && last.role === "user" && c !== (run && run.chat)) {
      c.messages.pop();
      if (!input.value) input.value = last.content;
    }
  }

  // ---- drawing
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function add(cls, text) {
    var d = el("div", cls, text);
    log.appendChild(d); log.scrollTop = log.scrollHeight;
    return d;
  }
  function show(c) {  // make c the current chat and draw it
    chat = c; repair(c);
    if (chats.indexOf(c) < 0) chats.push(c);
    system.value = c.system || ""; sysLabel();
    mode.value = c.mode || ""; if (mode.value !== (c.mode || "")) mode.value = "";
    log.replaceChildren();
    c.messages.forEach(function (m) {
      if (m.role === "user") { add("msg user", m.content); return; }
      markdown(add("msg assistant"), m.content);
      add(m.stopped ? "meta stopped" : "meta done", m.meta || (m.stopped ? "stopped" : ""));
    });
    log.scrollTop = log.scrollHeight;
    drawList(); save();
  }
  function drawList() {
    var items = chats.filter(function (c) { return c.messages.length || c === chat; }).sort(byNewest);
    list.replaceChildren.apply(list, items.map(function (c) {
      var li = el("li", c === chat ? "current" : ""), open = el("button", "open", title(c));
      var del = el("button", "del", "\u00d7");
      open.type = del.type = "button"; open.title = title(c); del.title = "Delete this chat";
      open.addEventListener("click", function () { switchTo(c); });
      del.addEventListener("click", function () { remove(c); });
      li.append(open, del);
      return li;
    }));
  }
  function sysLabel() {
    var t = system.value.trim().replace(/\s+/g, " ");
    sysHint.textContent = t ? ": " + (t.length > 70 ? t.slice(0, 70) + "\u2026" : t) : " (none)";
  }
  function switchTo(c) { if (c !== chat) { stop(); show(c); } }
  function remove(c) {
    if (run && run.chat === c) stop();
    chats = chats.filter(function (x) { return x !== c; });
    if (c === chat) show(chats.filter(function (x) { return x.messages.length; }).sort(byNewest)[0] || fresh());
    else { save(); drawList(); }
  }

  // ---- markdown: elements and textContent only, so model text can never become markup
  var FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/, HEADING = /^ {0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$/;
  var RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/, ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  var QUOTE = /^ {0,3}>\s?(.*)$/, TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  // code span | **bold** | __bold__ | *em* | _em_ | ~~del~~ | [text](url) | bare URL | \escape
  var INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__(?!\w)|\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)|_(?=\S)([\s\S]*?\S)_(?!\w)|~~(?=\S)([\s\S]*?\S)~~|\[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?(?:\s+"[^"\n]*")?\s*\)|(https?:\/\/[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'"*_~])|\\([!-\/:-@\[-`{-~])/g;
  function markdown(target, src) { target.replaceChildren(); blocks(src.split(/\r?\n/), target, 0); }
  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }
  function blocks(lines, parent, depth) {
    var i = 0, m;
    while (i < lines.length) {
      var line = lines[i];
      if (!line.trim()) i++;
      else if ((m = FENCE.exec(line))) i = fenced(lines, i, m, parent);
      else if ((m = HEADING.exec(line))) { inline(m[2], parent.appendChild(el("h" + m[1].length)), 0); i++; }
      else if (RULE.test(line)) { parent.appendChild(el("hr")); i++; }
      else if (QUOTE.test(line) && depth < 8) i = quote(lines, i, parent, depth);
      else if (ITEM.test(line)) i = listBlock(lines, i, parent);
      else if (line.indexOf("|") >= 0 && TABLE_SEP.test(lines[i + 1] || "") && lines[i + 1].indexOf("|") >= 0) i = table(lines, i, parent);
      else i = paragraph(lines, i, parent);
    }
  }
  function fenced(lines, i, m, parent) {
    // until the closing fence, or to the end while it streams
    var close = new RegExp("^\\s*" + m[1][0] + "{" + m[1].length + ",}\\s*$"), pad = /^\s*/.exec(lines[i])[0].length;
    var body = [], j = i + 1;
    for (; j < lines.length && !close.test(lines[j]); j++) body.push(lines[j].replace(new RegExp("^ {0," + pad + "}"), ""));
    parent.appendChild(codeBlock(body.join("\n"), m[2]));
    return j + 1;
  }
  function codeBlock(text, lang) {
    var box = el("div", "code"), bar = el("div", "code-bar"), copyBtn = el("button", "copy", "Copy");
    var pre = el("pre"), code = el("code", lang ? "language-" + lang : "", text);
    copyBtn.type = "button";
    copyBtn.addEventListener("click", function () { copy(text, copyBtn); });
    bar.append(el("span", "lang", lang || "code"), copyBtn);
    pre.appendChild(code); box.append(bar, pre);
    return box;
  }
  function quote(lines, i, parent, depth) {
    var inner = [], m;
    for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) inner.push(m[1]);
    blocks(inner, parent.appendChild(el("blockquote")), depth + 1);
    return i;
  }
  function listBlock(lines, i, parent) {
    // items with their indent; continuation lines join the item; a blank line ends the list unless more follows
    var items = [];
    while (i < lines.length) {
      var line = lines[i], m = ITEM.exec(line);
      if (m && !RULE.test(line)) items.push({indent: m[1].length, ordered: /\d/.test(m[2]), n: parseInt(m[2], 10), text: [m[3]]});
      else if (!line.trim()) { if (!/^\s*([-*+]|\d{1,9}[.)])\s|^\s{2,}\S/.test(lines[i + 1] || "")) break; }
      else if (startsBlock(line)) break;
      else items[items.length - 1].text.push(line.trim());
      i++;
    }
    nestList(items, parent);
    return i;
  }
  function nestList(items, parent) {
    var stack = [];  // open lists, innermost last: {indent, ordered, list, li}
    items.forEach(function (it) {
      while (stack.length && stack[stack.length - 1].indent > it.indent) stack.pop();
      var top = stack[stack.length - 1];
      if (top && top.indent === it.indent && top.ordered !== it.ordered) { stack.pop(); top = stack[stack.length - 1]; }
      if (!top || top.indent < it.indent) {
        var l = el(it.ordered ? "ol" : "ul");
        if (it.ordered && it.n !== 1) l.start = it.n;
        (top ? top.li : parent).appendChild(l);
        stack.push(top = {indent: it.indent, ordered: it.ordered, list: l});
      }
      top.li = top.list.appendChild(el("li"));
      inline(it.text.join("\n"), top.li, 0);
    });
  }
  function cells(line) { return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|"); }
  function table(lines, i, parent) {
    var t = el("table"), head = t.appendChild(el("thead")).appendChild(el("tr")), body = t.appendChild(el("tbody"));
    var align = cells(lines[i + 1]).map(function (c) { c = c.trim(); return /^:-+:$/.test(c) ? "center" : /-:$/.test(c) ? "right" : ""; });
    function row(tr, tag, line) {
      cells(line).forEach(function (c, k) {
        var td = tr.appendChild(el(tag));
        if (align[k]) td.style.textAlign = align[k];
        inline(c.trim(), td, 0);
      });
    }
    row(head, "th", lines[i]);
    for (i += 2; i < lines.length && lines[i].trim() && lines[i].indexOf("|") >= 0; i++) row(body.appendChild(el("tr")), "td", lines[i]);
    parent.appendChild(t);
    return i;
  }
  function paragraph(lines, i, parent) {
    var buf = [];
    while (i < lines.length && lines[i].trim() && !(buf.length && startsBlock(lines[i]))) buf.push(lines[i++]);
    inline(buf.join("\n"), parent.appendChild(el("p")), 0);
    return i;
  }
  function inline(text, parent, depth) {
    var re = new RegExp(INLINE.source, "g"), at = 0, m;
    while ((m = re.exec(text))) {
      if ((m[4] || m[6]) && /\w/.test(text.charAt(m.index - 1))) { re.lastIndex = m.index + 1; continue; }  // snake_case
      if (m.index > at) parent.appendChild(document.createTextNode(text.slice(at, m.index)));
      parent.appendChild(span(m, depth));
      at = re.lastIndex;
    }
    if (at < text.length) parent.appendChild(document.createTextNode(text.slice(at)));
  }
  function span(m, depth) {
    if (m[1]) return el("code", "", m[2]);
    var tag = m[3] || m[4] ? "strong" : m[5] || m[6] ? "em" : m[7] ? "del" : null;
    if (tag) return nested(el(tag), m[3] || m[4] || m[5] || m[6] || m[7], depth);
    if (m[8]) return link(m[8], m[9], depth);
    if (m[10]) return link(m[10], m[10], 99);
    return document.createTextNode(m[11]);
  }
  function nested(e, text, depth) {
    if (depth < 4) inline(text, e, depth + 1); else e.textContent = text;
    return e;
  }
  function link(text, url, depth) {
    var ok = false;
    try { ok = /^https?:\/\//i.test(url) && /^https?:$/.test(new URL(url).protocol); } catch (e) { /* not a URL */ }
    if (!ok) return nested(el("span"), text, depth);  // any other scheme stays text
    var a = el("a");
    a.href = url; a.target = "_blank"; a.rel = "noopener noreferrer";
    return nested(a, text, depth);
  }
  function copy(text, btn) {
    function done(ok) {
      btn.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(function () { btn.textContent = "Copy"; }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(legacyCopy(text)); });
    } else done(legacyCopy(text));
  }
  function legacyCopy(text) {  // plain http on a LAN address is no secure context: no navigator.clipboard there
    var t = el("textarea");
    t.value = text; t.style.position = "fixed"; t.style.opacity = "0";
    document.body.appendChild(t); t.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { /* unsupported */ }
    t.remove(); input.focus();
    return ok;
  }

  // ---- one turn
  function headers(c) {
    var h = {"Content-Type": "application/json"};
    var k = keyField.value.trim();
    if (k) h["Authorization"] = "Bearer " + k;
    if (c.session) h["X-Mlxmoe-Session"] = c.session;
    if (c.mode) h["X-Mlxmoe-Mode"] = c.mode;
    return h;
  }
  function body(c) {
    var msgs = c.messages.map(function (m) { return {role: m.role, content: m.content}; });
    if (c.system && c.system.trim()) msgs.unshift({role: "system", content: c.system});
    var b = {messages: msgs, stream: true, stream_options: {include_usage: true}};
    if (maxTokens) b.max_tokens = maxTokens;
    return b;
  }
  function meta(r, n, t0, tFirst, tEnd) {
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
    return parts.join(" \u00b7 ");
  }
  async function readStream(r, onData, onRead) {
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
      onRead();
    }
  }
  function paint(out, text) {  // follow the answer only while the reader is at the bottom
    var follow = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
    markdown(out, text);
    if (follow) log.scrollTop = log.scrollHeight;
  }
  function busy(on) {
    send.textContent = on ? "Stop" : "Send";
    send.classList.toggle("stop", on);
    send.title = on ? "Stop the answer (Esc)" : "";
  }
  function stop() { if (run) { run.stopped = true; run.ctl.abort(); } }
  async function ask(text) {
    if (run || !text.trim()) return;
    var c = chat, me = run = {chat: c, ctl: new AbortController(), stopped: false};
    var user = {role: "user", content: text}, msg = null;  // msg: the answer, in the chat once text came
    c.messages.push(user); c.updated = Date.now();
    busy(true); add("msg user", text);
    var out = add("msg assistant", ""), info = add("meta", "waiting for the first token\u2026");
    save(); drawList();
    var reply = "", chunks = 0, usage = null, t0 = performance.now(), tFirst = null, saved = t0, r = null;
    var count = function () { return usage && typeof usage.completion_tokens === "number" ? usage.completion_tokens : chunks; };
    try {
      r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(c), body: JSON.stringify(body(c)),
                                               signal: me.ctl.signal});
      if (!r.ok) {
        var e = await r.json().catch(function () { return {}; });
        throw new Error("HTTP " + r.status + ": " + ((e.error && e.error.message) || r.statusText));
      }
      c.session = r.headers.get("X-MLXMoE-Session") || c.session;
      await readStream(r, function (obj) {
        if (obj.error) throw new Error(obj.error.message || "error");
        if (obj.usage) usage = obj.usage;  // the last chunk, with stream_options.include_usage
        var ch = obj.choices && obj.choices[0], piece = ch && ch.delta && ch.delta.content;
        if (!piece) return;
        if (tFirst === null) tFirst = performance.now();
        chunks++; reply += piece;
        if (!msg) c.messages.push(msg = {role: "assistant", content: "", stopped: true});  // stopped until it ends
        msg.content = reply;
      }, function () {
        if (!reply) return;
        paint(out, reply); info.textContent = meta(r, count(), t0, tFirst, performance.now());
        if (performance.now() - saved > 1000) { saved = performance.now(); save(); }  // a reload keeps most of it
      });
      paint(out, reply);
      if (!msg) c.messages.push(msg = {role: "assistant", content: ""});
      delete msg.stopped;
      msg.meta = info.textContent = meta(r, count(), t0, tFirst, performance.now());
      info.className = "meta done";
    } catch (err) {
      if (me.stopped) stopped(c, user, msg, info, r && reply ? meta(r, count(), t0, tFirst, performance.now()) : "");
      else {
        c.messages = c.messages.filter(function (m) { return m !== user && m !== msg; });  // the next try resends it
        info.className = "meta err"; info.textContent = String(err.message || err);
      }
    } finally {
      run = null; busy(false); save(); drawList();
      if (c === chat) input.focus();
    }
  }
  function stopped(c, user, msg, info, line) {
    info.className = "meta stopped";
    if (msg) { msg.meta = info.textContent = "stopped" + (line ? " \u00b7 " + line : ""); return; }
    // stopped before any text: no turn happened; the question goes back to the box
    c.messages = c.messages.filter(function (m) { return m !== user; });
    info.textContent = "stopped before the answer began";
    if (c === chat && !input.value) input.value = user.content;
  }

  // ---- events
  document.getElementById("form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (run) { stop(); return; }
    var t = input.value;
    if (!t.trim()) return;
    input.value = ""; ask(t);
  });
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape" && run) stop();
    // Enter sends; while an answer streams it does nothing (Stop is a deliberate click)
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      if (!run) document.getElementById("form").requestSubmit();
    }
  });
  $("new").addEventListener("click", function () { stop(); show(fresh()); input.focus(); });
  mode.addEventListener("change", function () { chat.mode = mode.value; save(); });
  system.addEventListener("input", function () {
    chat.system = system.value; sysLabel();
    store(SYSTEM, system.value);  // the next new chat's too
    save();
  });
  window.addEventListener("storage", function (ev) {  // another tab saved: its chats, ours as we have it
    if (ev.key !== CHATS) return;
    chats = load().filter(function (c) { return c.id !== chat.id; }).concat([chat]);
    drawList();
  });
  fetch("/v1/models", {headers: headers({})}).then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
    if (j && j.data && j.data[0]) $("model").textContent = j.data[0].id;
  }).catch(function () {});

  var qs = params.getAll("q");
  show(qs.length ? fresh() : chats.filter(function (c) { return c.id === stored(CURRENT); })[0] || fresh());
  if (qs.length) {  // ?q=...: a new chat, each sent on load, one turn after another (scripts, tests)
    history.replaceState(null, "", location.pathname + (maxTokens ? "?max_tokens=" + maxTokens : ""));  // a reload restores, not resends
    (async function () { for (var i = 0; i < qs.length; i++) await ask(qs[i]); })();
  }
})();
"""


def render() -> str:
    modes = "".join(f'<option value="{m}">{m}</option>' for m in ROUTER_MODES)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlxmoe chat</title>
<link rel="icon" href="data:image/svg+xml,{quote(FAVICON, safe='')}">
<style>{CSS}</style></head>
<body>
<header><h1 id="model">mlxmoe</h1>
<label>Mode <select id="mode"><option value="">router default</option>{modes}</select></label>
<label>API key <input id="key" type="password" placeholder="if the router needs one" size="18"></label>
<a href="/">status</a></header>
<div id="main">
<aside><button id="new" type="button">New chat</button><ul id="chats"></ul></aside>
<section id="chat">
<details id="sys"><summary>System prompt<span id="sys-hint"></span></summary>
<textarea id="system" placeholder="Sent first in every request of this chat, e.g. &quot;Answer briefly.&quot;"></textarea></details>
<div id="log"></div>
<form id="form"><textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line, Esc stops)" autofocus></textarea>
<button id="send" type="submit">Send</button></form>
</section></div>
<script>{JS}</script>
</body></html>
"""
