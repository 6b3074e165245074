import io
import json

import pytest

from mlxmoe.progress import progress


def test_json_mode_throttles_and_finishes():
    out = io.StringIO()
    with progress(1000, "split", "json", stream=out, interval=3600) as p:
        for _ in range(10):
            p.advance(100)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # first update is shown at once, the rest are throttled, the final line always comes
    assert len(lines) == 2
    assert lines[0]["done"] == 100 and not lines[0]["finished"]
    last = lines[-1]
    assert last == {**last, "event": "progress", "description": "split", "done": 1000, "total": 1000, "finished": True}
    assert last["rate"] >= 0 and last["elapsed"] >= 0


def test_json_mode_every_update_without_throttle():
    out = io.StringIO()
    with progress(None, "eval", "json", stream=out, interval=0) as p:
        p.update(5)
        p.update(7)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [x["done"] for x in lines] == [5, 7, 7]
    assert lines[0]["total"] is None


def test_json_mode_final_line_on_error():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(10, "x", "json", stream=out) as p:
            p.advance(3)
            raise RuntimeError("boom")
    assert json.loads(out.getvalue().splitlines()[-1])["finished"] is True


def test_quiet_mode_writes_nothing():
    out = io.StringIO()
    with progress(10, "x", "quiet", stream=out) as p:
        p.advance(10)
    assert out.getvalue() == "" and p.done == 10


def test_bar_mode_shows_sizes():
    out = io.StringIO()
    with progress(3 * 2**20, "Writing trunk", "bar", stream=out) as p:
        p.advance(2**20)
        p.advance(2 * 2**20)
    text = out.getvalue()
    assert "Writing trunk" in text and "3.0/3.0 MiB" in text


def test_bar_mode_counts_items():
    out = io.StringIO()
    with progress(4, "Prompts", "bar", stream=out, unit="items") as p:
        p.advance(4)
    assert "4/4" in out.getvalue()


def test_bad_mode():
    with pytest.raises(ValueError, match="bar, quiet, json"):
        with progress(1, "x", "fancy"):
            pass


def test_progress_option():
    import click
    from click.testing import CliRunner

    from mlxmoe.commands.options import progress_option

    @click.command()
    @progress_option()
    def cmd(progress_mode):
        with progress(2, "work", progress_mode) as p:
            p.advance(2)

    r = CliRunner().invoke(cmd, ["--progress", "json"])
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[-1])["done"] == 2
    assert "--progress [bar|quiet|json]" in CliRunner().invoke(cmd, ["--help"]).output
    assert CliRunner().invoke(cmd, ["--progress", "loud"]).exit_code == 2
