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


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_gets_plain_lines_not_redraws(monkeypatch):
    """A file, pipe or CI log: a line at the start, at most one per PLAIN_INTERVAL, one at the end."""
    from mlxmoe import progress as mod

    out = io.StringIO()
    with progress(4 * 2**20, "split ref", "bar", stream=out) as p:
        for _ in range(4):
            p.advance(2**20)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[0] == "split ref: 0.0/4.0 MiB"
    assert text.splitlines()[-1].startswith("split ref: done 4.0/4.0 MiB in ")
    assert len(text.splitlines()) == 2  # updates within PLAIN_INTERVAL print nothing

    now = [0.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    with progress(10, "calibrate", "bar", stream=out, unit="items") as p:
        for _ in range(10):
            now[0] += 4.0  # a line every third update: PLAIN_INTERVAL is 10 s
            p.advance(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "calibrate: 0/10" and lines[-1] == "calibrate: done 10/10 in 40.0s (0.2/s)"
    assert lines[1:-1] == ["calibrate: 3/10 (30%), 0.2/s", "calibrate: 6/10 (60%), 0.2/s", "calibrate: 9/10 (90%), 0.2/s"]


def test_not_a_terminal_says_where_it_stopped():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(10, "x", "bar", stream=out, unit="items") as p:
            p.advance(3)
            raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("x: stopped at 3/10 in ")


def test_a_terminal_gets_the_bar():
    out = Tty()
    with progress(3 * 2**20, "Writing trunk", "bar", stream=out) as p:
        p.advance(3 * 2**20)
    assert "\r" in out.getvalue() and "━" in out.getvalue() and "3.0/3.0 MiB" in out.getvalue()


@pytest.mark.parametrize("mode", ["bar", "json"])
@pytest.mark.parametrize("stream", [Tty, io.StringIO])
def test_lazy_shows_nothing_before_the_first_update(mode, stream):
    """A validation error before any work draws no 0% bar (split)."""
    out = stream()
    with pytest.raises(ValueError):
        with progress(10, "split", mode, stream=out, lazy=True):
            raise ValueError("--groups 99")
    assert out.getvalue() == ""
    out = stream()
    with progress(10, "split", mode, stream=out, lazy=True) as p:
        p.advance(10)
    assert "10" in out.getvalue()
