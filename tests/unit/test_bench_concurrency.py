"""tools/bench_concurrency.py: its pure parts (percentiles, rows, machine names, the table, the
tokenizer it writes), and one slow end-to-end run on a tiny synthesized model."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_concurrency", REPO / "tools" / "bench_concurrency.py")
bc = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bc  # dataclasses look their module up
spec.loader.exec_module(bc)


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert bc.percentile(xs, 50) == 2.5
    assert bc.percentile(xs, 0) == 1.0 and bc.percentile(xs, 100) == 4.0
    assert bc.percentile(xs, 95) == pytest.approx(3.85)
    assert bc.percentile([7.0], 95) == 7.0
    assert math.isnan(bc.percentile([], 50))


def test_row_aggregates_over_the_wall_from_first_send_to_last_token():
    a = bc.StreamResult(sent=10.0, chunks=[10.5, 10.6, 10.8], tokens=3)
    b = bc.StreamResult(sent=10.2, chunks=[11.0, 11.1, 11.2, 12.0], tokens=4)
    row = bc.make_row("mlxmoe", [a, b])
    assert row["server"] == "mlxmoe" and row["streams"] == 2
    assert row["agg_tok_s"] == pytest.approx(7 / 2.0)
    # gaps pooled over streams: 0.1, 0.2, 0.1, 0.1, 0.8
    assert row["p50_itl_ms"] == pytest.approx(100.0)
    assert row["p95_itl_ms"] == pytest.approx(1e3 * bc.percentile([0.1, 0.2, 0.1, 0.1, 0.8], 95), abs=0.01)
    assert row["ttft_ms"] == pytest.approx(650.0)  # median of 500 and 800
    assert row["tokens"] == 7 and row["tokens_per_stream"] == [3, 4]


def test_row_of_streams_without_tokens_has_no_latencies():
    row = bc.make_row("mlx_lm.server", [bc.StreamResult(sent=1.0)])
    assert row["agg_tok_s"] == 0.0 and row["p50_itl_ms"] is None and row["ttft_ms"] is None


def test_median_runs_keeps_the_middle_run_per_row():
    rows = [{"server": "s", "streams": 1, "agg_tok_s": x, "run": i} for i, x in enumerate([5.0, 9.0, 7.0])]
    (row,) = bc.median_runs(rows)
    assert row["agg_tok_s"] == 7.0 and row["run"] == 2 and row["agg_tok_s_runs"] == [5.0, 7.0, 9.0]


@pytest.mark.parametrize("smi,device,slug", [
    ("GPU 0: NVIDIA H200 (UUID: GPU-1234)\n", None, "h200"),
    ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n", None, "h100-80gb-hbm3"),
    ("GPU 0: NVIDIA H200 NVL (UUID: x)", None, "h200"),
    ("", "Apple M2 Max", "apple-m2-max"),
    ("", None, "cpu"),
])
def test_machine_slug(smi, device, slug):
    assert bc.machine_slug(smi, device) == slug


def test_out_path_names_the_file_as_the_issue_says(tmp_path):
    assert bc.out_path(tmp_path, "2026-12-02", "h200") == tmp_path / "concurrency-2026-12-02-h200.json"
    assert bc.out_path(tmp_path / "x.json", "2026-12-02", "h200") == tmp_path / "x.json"


def test_table_has_a_line_per_row_and_the_ratio_to_one_stream():
    doc = {"machine": "cpu", "meta": {"model": "m", "tokens": 8}, "rows": [
        {"server": "mlxmoe", "streams": 2, "agg_tok_s": 30.0, "p50_itl_ms": 60.0, "p95_itl_ms": 70.0, "ttft_ms": 100.0},
        {"server": "mlxmoe", "streams": 1, "agg_tok_s": 10.0, "p50_itl_ms": 50.0, "p95_itl_ms": 55.0, "ttft_ms": 90.0},
        {"server": "mlx_lm.server", "streams": 1, "agg_tok_s": 12.0, "p50_itl_ms": None, "p95_itl_ms": None,
         "ttft_ms": None}]}
    lines = bc.table(doc).splitlines()
    assert lines[0].startswith("| server | streams |")
    body = [ln for ln in lines[2:] if ln.startswith("|")]
    assert body == ["| mlx_lm.server | 1 | 12.0 | 1.00x | - | - | - |",
                    "| mlxmoe | 1 | 10.0 | 1.00x | 50.0 | 55.0 | 90.0 |",
                    "| mlxmoe | 2 | 30.0 | 3.00x | 60.0 | 70.0 | 100.0 |"]
    assert "cpu: model m, tokens 8." in lines[-1]
    assert "- mlxmoe: aggregate >= mlx_lm.server's at every concurrency: not met at 1 streams" in lines


def test_targets_are_checked_per_mlxmoe_server():
    def row(server, n, agg, p50):
        return {"server": server, "streams": n, "agg_tok_s": agg, "p50_itl_ms": p50}
    rows = [row("mlxmoe", 1, 100, 10), row("mlxmoe", 4, 350, 14), row("mlxmoe", 8, 320, 20),
            row("mlx_lm.server", 1, 90, 10), row("mlx_lm.server", 8, 330, 20)]
    assert bc.targets(rows) == [
        "mlxmoe: 8 streams 3.20x one stream (target 3x): met",
        "mlxmoe: p50 ITL at 4 streams 1.40x one stream (target <= 1.5x): met",
        "mlxmoe: aggregate >= mlx_lm.server's at every concurrency: not met at 8 streams"]


def test_body_is_greedy_unseeded_and_bans_the_specials():
    b = bc.chat_body("hi", 16, [5, 6])
    assert b["max_tokens"] == 16 and b["temperature"] == 0.0 and "seed" not in b and "model" not in b
    assert b["stream"] and b["stream_options"] == {"include_usage": True}
    assert b["logit_bias"] == {"5": -100, "6": -100}
    assert bc.prompt_text("a-1", 3) != bc.prompt_text("a-2", 3)


def test_written_tokenizer_decodes_every_id_to_text(tmp_path):
    from mlx_lm.utils import load_tokenizer

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 500, "model_type": "qwen3_moe"}))
    banned = bc.add_tokenizer(tmp_path)
    assert banned == [497, 498, 499] == bc.special_ids(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 499
    tok = load_tokenizer(tmp_path)
    assert len(tok._tokenizer) == 500 and 499 in tok.eos_token_ids
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    assert ids[0] == 498 and max(ids) < 500
    assert tok.decode(tok.encode("a b\nc", add_special_tokens=False)) == "a b\nc"
    d = tok.detokenizer
    d.reset()
    for i in range(len(bc.BASE_BYTES), 497):  # every non-special id beyond the base alphabet
        before = d.text
        d.add_token(i)
        assert d.text != before, i  # each token is text of its own: one chunk per token


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_concurrency.py"), "--synthesize",
                        "qwen3-30b-a3b:1:4", "--streams", "1,2", "--tokens", "4", "--warmup-tokens", "2",
                        "--prompt-words", "2", "--groups", "all", "--workdir", str(tmp_path / "w"), "--out", str(out),
                        "--machine", "test"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["machine"] == "test"
    assert {(x["server"], x["streams"]) for x in doc["rows"]} == {(s, n) for s in ("mlxmoe", "mlx_lm.server")
                                                                   for n in (1, 2)}
    assert all(x["tokens_per_stream"] == [4] for x in doc["rows"])
    assert "| mlxmoe | 2 |" in r.stdout


def test_stream_counts_usage_tokens_and_retries_a_503_before_the_first_token():
    import asyncio

    import aiohttp
    from aiohttp import web

    calls = []

    async def chat(request):
        calls.append(await request.json())
        if len(calls) == 1:
            return web.json_response({"error": {"code": "no_nodes"}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for d in ({"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "a"}}]},
                  {"choices": [{"delta": {"content": " b"}}]}, {"choices": [], "usage": {"completion_tokens": 3}}):
            await resp.write(f"data: {json.dumps(d)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(request):
        return web.Response(text="ok")

    async def main():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as http:
                return await bc.one_stream(http, bc.Server("x", url, [], {}), bc.chat_body("x", 3, []))
        finally:
            await runner.cleanup()

    r = asyncio.run(main())
    assert r.retries == 1 and len(calls) == 2 and calls[0] == calls[1]
    assert len(r.chunks) == 2 and r.tokens == 3 and r.chunks[0] >= r.sent
