"""The router's human status page (`GET /`).

`render(status)` returns one self-contained HTML document: inline CSS, a small
inline script, no external assets (the page must work on a LAN with no
internet). The script is the only renderer: it draws from the JSON embedded in
the page, then re-fetches `/status/public` (what anyone may see) every 2 s and redraws. Keeping a single
renderer means the first paint and the refreshes can never disagree.

Untrusted text (peer names, reasons, session ids) only ever reaches the DOM
through `textContent`; the embedded JSON escapes `<`, `>` and `&` so nothing
in it can close the <script> element. A <noscript> block shows the same data
as escaped, pretty-printed JSON.
"""

from __future__ import annotations

import html
import json

REFRESH_MS = 2000


def _script_json(data) -> str:
    """JSON that is safe inside <script>: no `</script>`, no `<!--`."""
    s = json.dumps(data, sort_keys=True, default=str)
    return s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") \
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --bg:#f5f5f7; --card:#fff; --line:#e5e5ea;
        --up:#1a7f37; --ignored:#9a6700; --down:#cf222e; --bar:#0a84ff; --best:#30a46c; }
@media (prefers-color-scheme: dark) {
  :root { --fg:#f5f5f7; --muted:#98989d; --bg:#1c1c1e; --card:#2c2c2e; --line:#3a3a3c; } }
* { box-sizing: border-box; }
body { margin:0; padding:24px; font:14px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
h1 { font-size:20px; margin:0 0 4px; } h2 { font-size:15px; margin:0 0 10px; }
.sub { color:var(--muted); margin-bottom:18px; } .muted { color:var(--muted); }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px; margin-bottom:16px; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:500; font-size:12px; }
.state { font-weight:600; } .state.up { color:var(--up); } .state.ignored { color:var(--ignored); }
.state.down { color:var(--down); }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size:12px; }
.bars { display:grid; grid-template-columns: 80px 1fr 60px; gap:6px 10px; align-items:center; max-width:640px; }
.track { background:var(--line); border-radius:4px; height:14px; overflow:hidden; }
.fill { background:var(--bar); height:100%; } .fill.best { background:var(--best); }
.mini { display:inline-block; width:60px; height:8px; background:var(--line); border-radius:3px; overflow:hidden;
        vertical-align:middle; margin-right:4px; }
.mini > span { display:block; height:100%; background:var(--bar); }
.counters span { margin-right:18px; } .warn { color:var(--down); }
.sstate.generating { color:var(--best); font-weight:600; } .sstate.kept { color:var(--muted); }
#stale { display:none; color:var(--down); margin-left:8px; }
"""

# The renderer. `el(tag, attrs, ...children)` builds nodes; strings become
# text nodes, so untrusted values are never parsed as HTML.
JS = r"""
(function () {
  var REFRESH = __REFRESH_MS__, KEPT_SHOWN = 5;
  var status = JSON.parse(document.getElementById("initial-status").textContent);

  function el(tag, attrs) {
    var n = document.createElement(tag);
    for (var k in (attrs || {})) {
      if (k === "style") n.style.cssText = attrs[k]; else n.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      n.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return n;
  }
  function bytes(n) {
    if (typeof n !== "number") return "?";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
  }
  function ago(t) {
    if (typeof t !== "number") return "?";
    var s = Math.max(0, Date.now() / 1000 - t);
    return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  function dur(s) {
    if (typeof s !== "number") return "?";
    return s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
  }
  function num(x, d) { return typeof x === "number" ? x.toFixed(d) : "?"; }
  function short(h) { return h ? String(h).slice(0, 12) : "?"; }
  function sortedScores(scores) {
    return Object.keys(scores || {}).sort(function (a, b) { return Number(a) - Number(b); })
      .map(function (g) { return [g, Number(scores[g])]; });
  }
  function row(tag, cells) {
    var tr = el("tr");
    cells.forEach(function (c) { tr.appendChild(el(tag, {}, c)); });
    return tr;
  }
  function table(headers, rows, empty) {
    if (!rows.length) return el("p", {"class": "muted empty"}, empty);
    var t = el("table", {}, row("th", headers));
    rows.forEach(function (r) { t.appendChild(row("td", r)); });
    return t;
  }

  function quality(q) {  // a layout node's held-out perplexity ratio to the full model, e.g. "×1.04 (worst ×1.09)"
    if (!q || typeof q.ppl_ratio !== "number") return el("span", {"class": "quality muted"}, "-");
    return el("span", {"class": "quality", title: "perplexity vs the full model on held-out text, pinned to this node" +
      (typeof q.agreement === "number" ? "; greedy agreement " + q.agreement.toFixed(2) : "")},
      "\u00d7" + q.ppl_ratio.toFixed(2) + (typeof q.worst_ppl_ratio === "number" ?
        " (worst \u00d7" + q.worst_ppl_ratio.toFixed(2) + ")" : ""));
  }

  function peers(s) {
    var rows = (s.peers || []).map(function (p) {
      var mismatch = p.manifest_hash && s.manifest_hash && p.manifest_hash !== s.manifest_hash;
      return [
        el("span", {"class": "peer-name"}, p.name),
        el("span", {"class": "peer-groups"}, (p.groups || []).join(", ") || "-"),
        el("span", {"class": "state " + p.state}, p.state || "?"),
        p.reason ? el("span", {"class": "reason"}, p.reason) : "",
        bytes(p.free_memory),
        String(p.active_sessions == null ? "?" : p.active_sessions),
        el("span", {"class": "queue", title: "streams decoding + waiting"}, String(p.queue_depth == null ? "?" : p.queue_depth)),
        quality(p.expected_quality),
        p.backend || "?",
        el("span", {"class": "mono" + (mismatch ? " warn" : ""), title: p.manifest_hash || ""}, short(p.manifest_hash)),
        el("span", {"class": "mono muted"}, p.url || "")
      ];
    });
    return el("div", {"class": "card", id: "peers"}, el("h2", {}, "Peers (" + rows.length + ")"),
      table(["Name", "Group", "State", "Why", "Free memory", "Sessions", "Queue", "Expected quality", "Backend",
             "Manifest", "URL"], rows,
            "No peers yet. Start `mlxmoe node` on each Mac; they are found over Bonjour."));
  }

  function miniScores(scores) {
    var span = el("span", {"class": "scores"});
    sortedScores(scores).forEach(function (gs) {
      var w = Math.round(100 * Math.max(0, Math.min(1, gs[1])));
      span.appendChild(el("span", {title: "group " + gs[0] + ": " + gs[1].toFixed(3)}, "g" + gs[0] + " ",
        el("span", {"class": "mini"}, el("span", {style: "width:" + w + "%"})), gs[1].toFixed(2) + " "));
    });
    return span;
  }

  function modeText(x) {  // e.g. "soft · experts of group 2 · 1 migration · 120 remote calls"
    var t = [x.mode || ""];
    if (x.routing === "group") t.push("experts of group " + x.expert_group);
    if (x.routing === "onehop") t.push("one hop");
    if (x.routing === "split") t.push("split top-k");
    if (x.migrations && x.migrations.length) t.push(x.migrations.length + " migration" + (x.migrations.length > 1 ? "s" : ""));
    if (x.race) t.push("race won by group " + x.race.winner);
    if (x.remote_calls) t.push(x.remote_calls + " remote calls");
    if (typeof x.quality_meter === "number") t.push("meter " + x.quality_meter.toFixed(2));
    return t.join(" \u00b7 ");
  }

  function counts(list) {  // as mlxmoe.ui.menubar.session_counts
    var g = 0, a = 0;
    list.forEach(function (x) { if (x.generating) g++; if (x.active !== false) a++; });
    return {generating: g, active: a, kept: list.length - a};
  }
  function stateOf(x) {
    if (x.generating) return el("span", {"class": "sstate generating"}, "generating" +
      (typeof x.tok_s === "number" ? " \u00b7 " + x.tok_s.toFixed(1) + " tok/s" : ""));
    return el("span", {"class": "sstate " + (x.active === false ? "kept" : "active")}, x.active === false ? "kept" : "active");
  }
  function sessions(s) {
    var list = (s.sessions || []).slice().sort(function (a, b) {  // in-flight chats first, then the latest used
      return (b.generating ? 1 : 0) - (a.generating ? 1 : 0) || (b.last_used || 0) - (a.last_used || 0);
    });
    var n = counts(list), shown = list.filter(function (x, i) { return x.active !== false || i < n.active + KEPT_SHOWN; });
    var rows = shown.map(function (x) {
      return [el("span", {"class": "mono session-id"}, x.id), stateOf(x), x.node, "group " + x.group, modeText(x),
              num(x.margin, 3), miniScores(x.scores), String(x.turns), String(x.tokens), ago(x.last_used)];
    });
    var head = "Sessions: " + n.active + " active" + (n.generating ? " (" + n.generating + " generating)" : "") +
      " \u00b7 " + n.kept + " kept";
    var more = list.length - shown.length;
    return el("div", {"class": "card", id: "sessions"}, el("h2", {id: "session-counts"}, head),
      more > 0 ? el("p", {"class": "muted"}, "The " + shown.length + " most recent shown; " + more + " more kept.") : null,
      table(["Session", "State", "Node", "Pinned to", "Mode", "Margin", "Scores", "Turns", "Tokens", "Last used"], rows,
            "No sessions yet. Start one with `mlxmoe chat` or the web chat."));
  }

  function placement(s) {
    var lp = s.last_placement, card = el("div", {"class": "card", id: "placement"}, el("h2", {}, "Latest placement"));
    if (!lp) { card.appendChild(el("p", {"class": "muted empty"}, "No session has been placed yet.")); return card; }
    var where = lp.node ? " \u2192 " + lp.node + ", group " + lp.group +
      (String(lp.group) === String(lp.best) ? "" : " (best scored: group " + lp.best + ")") : " \u2192 best scored: group " + lp.best;
    card.appendChild(el("p", {"class": "muted"}, "Session ", el("span", {"class": "mono"}, lp.session),
      where + " \u00b7 margin " + num(lp.margin, 3) + " \u00b7 scored at layers " +
      (lp.layers || []).join(", ") + " \u00b7 " + num(lp.elapsed_ms, 1) + " ms"));
    var bars = el("div", {"class": "bars"});
    sortedScores(lp.scores).forEach(function (gs) {
      var best = String(gs[0]) === String(lp.best), w = Math.round(1000 * Math.max(0, Math.min(1, gs[1]))) / 10;
      bars.appendChild(el("span", {}, "group " + gs[0]));
      bars.appendChild(el("div", {"class": "track"}, el("div", {"class": "fill" + (best ? " best" : ""), "data-group": gs[0], style: "width:" + w + "%"})));
      bars.appendChild(el("span", {"class": "mono"}, gs[1].toFixed(3)));
    });
    card.appendChild(bars);
    return card;
  }

  function draw(s) {
    var c = s.counters || {}, up = (s.peers || []).filter(function (p) { return p.state === "up"; }).length;
    document.getElementById("model").textContent = s.model || "mlxmoe";
    document.getElementById("summary").textContent = up + "/" + (s.peers || []).length + " peers up \u00b7 manifest " +
      short(s.manifest_hash) + " \u00b7 up " + dur(s.uptime_s);
    var app = document.getElementById("app");
    app.replaceChildren(sessions(s), placement(s), peers(s),
      el("div", {"class": "card counters", id: "counters"}, el("span", {}, "Requests: " + (c.requests || 0)),
         el("span", {}, "Failovers: " + (c.failovers || 0)), el("span", {}, "Rejected: " + (c.rejected || 0))));
  }

  function refresh() {
    fetch("/status/public", {cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (s) { status = s; document.getElementById("stale").style.display = "none"; draw(s); })
      .catch(function () { document.getElementById("stale").style.display = "inline"; })
      .then(function () { setTimeout(refresh, REFRESH); });
  }
  draw(status);
  if (location.protocol !== "file:") setTimeout(refresh, REFRESH);
})();
"""


def render(status: dict) -> str:
    title = html.escape(str(status.get("model") or "mlxmoe"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · mlxmoe status</title>
<style>{CSS}</style></head>
<body>
<h1 id="model">{title}</h1>
<div class="sub"><span id="summary"></span> · <a href="/chat">web chat</a><span id="stale">· router unreachable, retrying…</span></div>
<div id="app"></div>
<noscript><pre>{html.escape(json.dumps(status, indent=2, sort_keys=True, default=str))}</pre></noscript>
<script type="application/json" id="initial-status">{_script_json(status)}</script>
<script>{JS.replace("__REFRESH_MS__", str(REFRESH_MS))}</script>
</body></html>
"""
