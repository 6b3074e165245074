"""tools/bench_isolation.py: its pure parts (gap statistics, victim accounting, log counting, the
table, --quick), a flood and a slowloris against a plain socket server, and one slow end-to-end
`--quick` run on real clusters of the reference model."""

import importlib.util
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_isolation", REPO / "tools" / "bench_isolation.py")
bi = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bi  # dataclasses look their module up
spec.loader.exec_module(bi)


def test_percentile_and_gap_statistics():
    assert bi.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert math.isnan(bi.percentile([], 50))
    times = [0.0, 0.1, 0.2, 1.4, 1.5, 1.6]
    assert bi.gaps(times) == pytest.approx([0.1, 0.1, 1.2, 0.1, 0.1])
    st = bi.gap_stats(bi.gaps(times))
    assert st["n"] == 5 and st["worst_ms"] == 1200.0 and st["p50_ms"] == 100.0
    assert st["p99_ms"] == pytest.approx(1e3 * bi.percentile(bi.gaps(times), 99), abs=0.1)
    assert bi.gap_stats([]) == {"n": 0, "worst_ms": None, "p50_ms": None, "p99_ms": None}
    assert bi.time_stats([0.5, 2.0]) == {"n": 2, "p50_ms": 1250.0, "max_ms": 2000.0}


def test_gaps_during_a_window_include_the_gaps_that_straddle_it():
    times = [0.0, 0.1, 0.2, 1.4, 1.5, 3.0]
    # window [0.15, 1.45]: the gap 0.1-0.2 ends inside, 0.2-1.4 lies inside, 1.4-1.5 begins inside
    assert bi.gaps_during(times, 0.15, 1.45) == pytest.approx([0.1, 1.2, 0.1])
    assert bi.gaps_during(times, 5.0, 6.0) == []
    assert bi.gaps_during(times, 0.0, 10.0) == pytest.approx(bi.gaps(times))


def test_a_victim_is_lost_on_an_error_or_a_short_answer_that_did_not_stop():
    ok = bi.Chat(sent=0.0, status=200, tokens=64, finish="length")
    stopped = bi.Chat(sent=0.0, status=200, tokens=12, finish="stop")
    short = bi.Chat(sent=0.0, status=200, tokens=12, finish="length")
    broken = bi.Chat(sent=0.0, status=200, tokens=64, finish="length", error="peer_failed")
    refused = bi.Chat(sent=0.0, status=503, error="no_nodes")
    assert [bi.lost(c, 64) for c in (ok, stopped, short, broken, refused)] == [False, False, True, True, True]
    assert ok.served and not refused.served and not bi.Chat(sent=0.0, status=200).served


def test_chat_times():
    c = bi.Chat(sent=10.0, chunks=[10.5, 10.6], done=11.0)
    assert c.ttft == pytest.approx(0.5) and c.latency == pytest.approx(1.0)
    assert bi.Chat(sent=1.0).ttft is None and bi.Chat(sent=1.0).latency is None
    assert bi.ratio(3.0, 2.0) == 1.5 and bi.ratio(None, 2.0) is None and bi.ratio(1.0, 0.0) is None


LOG = """\
12:00:00 mlxmoe.access INFO op=generate status=200 session=ref-1 prompt_tokens=5 ms=10.0
12:00:01 mlxmoe.access INFO op=generate status=502 session=ref-2 ms=31085.9
12:00:01 mlxmoe.access INFO op=experts status=200 ms=30494.6
12:00:01 mlxmoe.access INFO op=experts status=200 ms=12.0
12:00:02 mlxmoe.limits WARNING node connections in the last 10s: 62 TLS handshakes failed (open: 2, cap 256)
12:00:03 mlxmoe.api ERROR engine failed
Traceback (most recent call last):
  File "x.py", line 1, in <module>
AssertionError: boom
12:00:04 mlxmoe.access INFO method=POST path=/v1/chat/completions status=200 prompt_tokens=5005 ms=5.0
"""


def test_log_counts_and_excerpts():
    c = bi.log_counts(LOG)
    assert c == {"access_lines": 5, "status_5xx": 1, "flood_lines": 1, "traceback": 1, "assertionerror": 1,
                 "errors": 1}
    ex = bi.excerpts(LOG, n=10)
    assert ex[0].startswith("12:00:02 mlxmoe.limits") and any("AssertionError: boom" in x for x in ex)
    assert any(x.startswith("Traceback") and x.endswith("AssertionError: boom") for x in ex)
    assert bi.slow_experts(LOG) == ["12:00:01 mlxmoe.access INFO op=experts status=200 ms=30494.6"]
    assert bi.merge_counts([{"a": 1}, {"a": 2, "b": 1}]) == {"a": 3, "b": 1}


def test_log_mark_reads_only_what_came_after(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("old line\n")
    mark = bi.LogMark([f, tmp_path / "missing.log"])
    with open(f, "a") as out:
        out.write("new line\n")
    assert mark.since().strip() == "new line"


def test_mixed_prompts_are_distinct_and_cycle_through_the_domains():
    by = {"code": ["c0", "c1"], "prose_en": ["e0", "e1"], "structured": ["s0"]}
    assert bi.mixed_prompts(by, 5) == ["c0", "e0", "s0", "c1", "e1"]
    assert bi.mixed_prompts(by, 2, chars=1) == ["c", "e"]


def test_out_path_and_machine(tmp_path):
    assert bi.out_path(tmp_path, "2026-12-07") == tmp_path / "isolation-2026-12-07.json"
    assert bi.out_path(tmp_path / "x.json", "2026-12-07") == tmp_path / "x.json"
    m = bi.machine()
    assert m["cpus"] >= 1 and m["network"] == "loopback" and m["platform"]


def test_quick_shrinks_only_what_was_left_at_its_default():
    a = bi.parse_args(["--quick", "--flood", "500", "--only", "flood,schema"])
    assert a.flood == 500 and a.slowloris == bi.QUICK["slowloris"] and a.victims == bi.QUICK["victims"]
    assert a.only == ["flood", "schema"] and a.split_modes == ["split"] and not a.warm
    full = bi.parse_args([])
    assert full.flood == 2100 and full.victims == 8 and full.split_modes == ["split", "onehop"] and full.warm
    with pytest.raises(SystemExit):
        bi.parse_args(["--only", "nope"])


def _doc() -> dict:
    logs = {"node": {"flood_lines": 2}, "router": {"flood_lines": 1}}
    flood_side = {"flood": {"opened": 2100, "open_at_end": 0}, "chats": 5, "chats_served": 5, "time_ratio": 1.1,
                  "rss_mb": {n: {"before": 1, "peak": 2, "after": 1} for n in ("node", "router")},
                  "fds": {n: {"before": 10, "peak": 74, "after": 10} for n in ("node", "router")}, "log": logs}
    return {"date": "2026-12-07", "machine": {"cpus": 2}, "scenarios": {
        "schema": {"hostile": [{"via": "api", "status": 400, "ms": 15.0}, {"via": "node rpc", "status": 400, "ms": 90.0}],
                   "victims": {"n": 8, "lost": 0, "text_changed": 1, "text_changed_without_hostile": 2},
                   "status_5xx": {"client": 0, "logs": 0}},
        "flood": {"node": flood_side, "router": flood_side,
                  "slowloris": {"slow": {"opened": 9000, "closed_by_server": 8700}, "chats": 12, "chats_served": 12,
                          "chat_ms": {"max_ms": 3000.0}, "time_ratio": 1.2,
                                "log": {"traceback": 0, "assertionerror": 0}}},
        "longprompt": {"stream_gaps_during_prefill": {"worst_ms": 1200.0, "p50_ms": 80.0, "p99_ms": 1100.0},
                       "long_prompt": {"ttft_ms_beside_stream": 40000.0, "ttft_ms_alone": 38000.0},
                       "prefill_rpc": {"generate_ms": 900.0, "prefill_ms": 38000.0}},
        "split": {"modes": {"split": {"errored": 0, "streams": 48, "failovers": 0, "status_5xx": 3,
                                      "ttft_max_ms": 36000.0, "slow_experts_calls": ["x"],
                                      "nodes": {"a": 30, "b": 18}}}}}}


def test_table_has_a_line_per_figure():
    lines = bi.table(_doc()).splitlines()
    text = "\n".join(lines)
    assert any(ln.startswith("schema") and "hostile api" in ln and ln.endswith("400, 15.0") for ln in lines)
    assert any("victims lost" in ln and ln.endswith("0 / 8") for ln in lines)
    assert any("texts changed" in ln and ln.endswith("1 / 2") for ln in lines)
    assert any("slowloris: chats served" in ln and ln.endswith("12/12, 3000.0, x1.2") for ln in lines)
    assert any("node flood: chats served" in ln and ln.endswith("5/5, x1.1") for ln in lines)
    assert any("summary lines in the node's log" in ln and ln.endswith("2") for ln in lines)
    assert any("stream gaps during prefill" in ln and ln.endswith("1200.0/80.0/1100.0") for ln in lines)
    assert any("split: streams errored" in ln and ln.endswith("0 / 48, 0, 3") for ln in lines)
    assert "a: 30, b: 18" in text
    json.dumps(_doc())  # the document is plain JSON
    assert bi.table({"scenarios": {}}) == ""


def _server(handler):
    """A listening socket on loopback whose accepted connections `handler(conn, i)` serves in threads
    (i: the connection's number in accept order)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    stop = threading.Event()

    def loop():
        srv.settimeout(0.1)
        i = 0
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=handler, args=(conn, i), daemon=True).start()
            i += 1
    threading.Thread(target=loop, daemon=True).start()
    return srv, stop


def test_flood_opens_idle_connections_and_sees_which_the_server_closed():
    held = []

    def handler(conn, i):  # keep every other connection, close the rest
        if i % 2:
            conn.close()
        held.append(conn)
    srv, stop = _server(handler)
    try:
        fl = bi.Flood("127.0.0.1", srv.getsockname()[1], 40)
        got = fl.open(10)
        assert got["opened"] == 40 and got["failed"] == {}
        deadline = time.time() + 5
        while fl.still_open() > 20 and time.time() < deadline:
            time.sleep(0.05)
        assert fl.still_open() == 20
        fl.close()
        assert fl.socks == []
    finally:
        stop.set()
        srv.close()


def test_flood_counts_refused_connects():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    got = bi.Flood("127.0.0.1", port, 5).open(5)
    assert got["opened"] == 0 and sum(got["failed"].values()) == 5


def test_slowloris_trickles_and_replaces_the_connections_the_server_closes():
    got = []

    def handler(conn, i):  # reads the partial header and the trickle, then closes after 0.3 s
        conn.settimeout(0.05)
        t0, n = time.time(), 0
        while time.time() - t0 < 0.3:
            try:
                n += len(conn.recv(1024))
            except OSError:
                pass
        got.append(n)
        conn.close()
    srv, stop = _server(handler)
    try:
        res = bi.Slowloris("127.0.0.1", srv.getsockname()[1], 3, seconds=1.5, every=0.1).run()
        assert res["target"] == 3 and res["opened"] > 3 and res["failed"] == {}
        assert res["closed_by_server"] >= 3 and res["open_at_end"] <= 3
        assert res["closed_by_server"] + res["open_at_end"] == res["opened"]
        assert 0.2 < res["lifetime_s"]["p50"] < 1.0 and res["bytes_trickled"] > 0
        assert got and all(n > len(bi.Slowloris.PREFIX) for n in got)  # a partial header, then one byte at a time
    finally:
        stop.set()
        srv.close()


def test_raise_nofile_never_lowers_the_limit():
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert bi.raise_nofile(16) == soft


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out = tmp_path / "iso.json"
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_isolation.py"), "--quick", "--out", str(out),
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= {"date", "machine", "settings", "scenarios"} and doc["settings"]["quick"]
    sc = doc["scenarios"]
    assert set(sc) == set(bi.SCENARIOS)
    assert {h["status"] for h in sc["schema"]["hostile"]} == {400}
    assert sc["schema"]["victims"]["lost"] == 0 and sc["schema"]["status_5xx"] == {"client": 0, "logs": 0}
    assert sc["flood"]["node"]["chats_served"] == sc["flood"]["node"]["chats"] >= 1
    assert sc["flood"]["router"]["chats_served"] == sc["flood"]["router"]["chats"] >= 1
    assert sc["flood"]["log"]["traceback"] == 0
    assert sc["longprompt"]["stream"]["error"] is None and sc["longprompt"]["long_prompt"]["status"] == 200
    assert sc["split"]["modes"]["split"]["errored"] == 0
    assert "victims lost" in r.stdout
    # every process it started is gone (each ran in its own process group under the workdir's logs)
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "w") in " ".join(p.info["cmdline"] or [])]
    assert left == []
    print(f"--quick took {time.time() - t0:.0f}s")
