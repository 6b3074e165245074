"""`mlxmoe eval`: how far masked routing is from the full model."""

from __future__ import annotations

import json

import click

from mlxmoe.commands.options import clean_errors
from mlxmoe.quality import grouping as gr
from mlxmoe.quality.eval import PLACEMENTS


def parse_ints(s: str, what: str, lo: int = 0) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{s!r}: {what} must be comma-separated integers, e.g. 2,3,4") from None
    if not out or any(x < lo for x in out):
        raise click.BadParameter(f"{s!r}: {what} must be integers >= {lo}")
    return out


def parse_names(s: str, allowed, what: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise click.BadParameter(f"unknown {what} {bad or s!r}; choose from {', '.join(allowed)}")
    return out


def warn_builtin(bundle, given) -> None:
    """Once, on stderr: the builtin suites were written for the bundled model."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.errors import MlxMoeError
    from mlxmoe.quality.suites import builtin_warning

    missing = [opt for opt, v in given if not v]
    if not missing:
        return
    try:
        model = Manifest.load(bundle).model
    except MlxMoeError:
        return  # the run itself says what is wrong with the bundle
    w = builtin_warning(model, " / ".join(missing))
    if w:
        click.echo(w, err=True)


def check_blas(mode: str) -> dict:
    """Time a float32 matmul; on a slow Linux CPU BLAS say how to fix it
    (stderr, unless quiet). The result goes into the report."""
    from mlxmoe.quality import blas

    r = blas.measure()
    status, detail, fix = blas.verdict(r)
    if status != "ok" and mode != "quiet":
        click.echo(f"warning: {detail}; this eval will be slow. Fix: {fix}", err=True)
    return {**r, "status": status, "detail": detail, "fix": fix}


@click.command("eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--suite", "suites", multiple=True,
              help="Held-out text: 'builtin' (shipped heldout.jsonl, the default; written for the bundled reference "
                   "model), a .jsonl of {domain, text} lines, or a .txt file.")
@click.option("--groups", default=None, help="Group counts to try, e.g. 2,3,4 (default: the bundle's).")
@click.option("--strategies", default="bundle", show_default=True,
              help=f"Comma list of: bundle (the bundle's own grouping + overlay), {', '.join(gr.STRATEGIES)}.")
@click.option("--overlay", "overlays", default="0", show_default=True, help="Overlay sizes (experts per layer), e.g. 0,1,2,4,8.")
@click.option("--overlay-rules", default="mass", show_default=True, help=f"Comma list of: {', '.join(gr.OVERLAY_RULES)}.")
@click.option("--placement", "placements", default=",".join(PLACEMENTS), show_default=True,
              help="Comma list: first (first MoE layer's router on the prompt), layers (every MoE layer), "
                   "race (best prompt log-prob per node), oracle (best continuation log-prob: the upper bound).")
@click.option("--passages", "per_domain", type=int, help="At most this many passages per domain.")
@click.option("--prompt-tokens", type=int, default=32, show_default=True, help="Prompt length placement sees; the rest is scored.")
@click.option("--race-tokens", type=int, default=16, show_default=True, help="Prompt tokens whose log-prob the race compares.")
@click.option("--calib-suite", "calib_suites", multiple=True,
              help="Suite for the statistics that coactivation/domain groupings and overlays need (default: builtin).")
@click.option("--onehop", is_flag=True, help="Also evaluate one-hop routing (per MoE layer and token, the group with "
              "the most top-k mass: local or one remote node) on the bundle's groups.")
@click.option("--split", is_flag=True, help="Also evaluate split routing (top-k over the node's experts and ONE other "
              "group's; the chosen experts run where they are held).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of quality vs memory per node (needs matplotlib).")
@click.option("--progress", "progress_mode", type=click.Choice(["bar", "quiet", "json"]),
              help="Progress on stderr (stdout stays the report): bar (default), json lines, or quiet "
                   "(the default with --json).")
def eval_cmd(bundle, suites, groups, strategies, overlays, overlay_rules, placements, per_domain, prompt_tokens,
             race_tokens, calib_suites, onehop, split, as_json, plot, progress_mode):
    """Measure how far masked routing is from the full model on held-out text.

    Example: mlxmoe eval bundles/ref --groups 2,3,4 --strategies contiguous,coactivation --overlay 0,4,8
    """
    groups_ = parse_ints(groups, "--groups", lo=1) if groups else None
    strategies_ = parse_names(strategies, ("bundle",) + gr.STRATEGIES, "strategy")
    overlays_ = parse_ints(overlays, "--overlay")
    rules_ = parse_names(overlay_rules, gr.OVERLAY_RULES, "overlay rule")
    placements_ = parse_names(placements, PLACEMENTS, "placement")
    if prompt_tokens < 2 or race_tokens < 1:
        raise click.BadParameter("--prompt-tokens must be >= 2 and --race-tokens >= 1")
    if plot:  # fail before the long run, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib, which is not installed: pip install matplotlib")
    from mlxmoe.quality.eval import run_eval
    from mlxmoe.quality.report import onehop_table, table, write_plot

    mode = progress_mode or ("quiet" if as_json else "bar")
    needs_calib = any(s in ("coactivation", "domain") for s in strategies_) or any(overlays_)
    warn_builtin(bundle, [("--suite", suites)] + ([("--calib-suite", calib_suites)] if needs_calib else []))

    def go():
        blas = check_blas(mode)
        report = run_eval(bundle, suites or ("builtin",), groups_, strategies_, overlays_, rules_, placements_,
                          per_domain, prompt_tokens, race_tokens, calib_suites or ("builtin",), mode,
                          onehop=onehop, split=split)
        report["blas"] = blas
        if plot:
            write_plot(report, plot)
        return report

    report = clean_errors(go)
    if as_json:
        click.echo(json.dumps(report))
        return
    import sys

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table(report, f"{report['model']}: {sum(report['tokens'].values())} scored tokens, "
                                f"{report['passages']} passages"))
    for mode in ("onehop", "split"):
        if mode in report:
            console.print(onehop_table(report[mode]))

