"""The eval report as rich tables and a quality-vs-memory plot."""

from __future__ import annotations

from mlxmoe.errors import MlxMoeError
from mlxmoe.quality import grouping as gr


def with_ci(value: float, ci=None, fmt: str = ".3f") -> str:
    """`1.320 [1.280, 1.370]`: a mean and its bootstrap 95% interval."""
    return f"{value:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def passage_line(use: dict) -> str:
    """What happened to the suite's passages, for a table caption."""
    skipped = ", ".join(f"{n} {why}" for why, n in use.get("skipped", {}).items() if n)
    return (f"passages: {use['used']} of {use['given']} used"
            + (f", {use['short_prompt']} short ones with a shorter prompt" if use.get("short_prompt") else "")
            + (f"; skipped: {skipped}" if skipped else ""))


def table(report: dict, title: str = "masked routing vs full model"):
    from rich.table import Table

    t = Table(title=title, caption=(passage_line(report["passage_use"]) + "; [95% bootstrap intervals]")
              if "passage_use" in report else None)
    for col in ("config", "placement", "MB/node", "x plain", "capture", "KL", "agree", "ppl x", "worst ppl x",
                "worst agree", "regret"):
        t.add_column(col, justify="left" if col in ("config", "placement") else "right",
                     no_wrap=col in ("KL", "agree", "ppl x", "regret"))  # a mean and its interval stay on one line
    for r in report["results"]:
        mean, worst, ci = r["mean"], r["worst"], r.get("intervals", {})
        t.add_row(r["config"], r["placement"], f"{r['node_bytes'] / 1e6:.2f}", f"{r['mem_ratio']:.2f}",
                  f"{mean['capture']:.3f}", with_ci(mean["kl"], ci.get("kl")),
                  with_ci(mean["agreement"], ci.get("agreement")), with_ci(mean["ppl_ratio"], ci.get("ppl_ratio")),
                  f"{worst['ppl_ratio']:.3f}", f"{worst['agreement']:.3f}", with_ci(mean["regret"], ci.get("regret"), ".2f"))
    if report.get("nodes"):
        t.add_section()
        for nd in report["nodes"]:
            t.add_row(*node_row(nd))
    return t


def node_row(nd: dict) -> list[str]:
    """One node of the bundle with every chat pinned to it (eval's `nodes`), in table()'s columns."""
    mean, worst, ci = nd["mean"], nd["worst"], nd.get("intervals", {})
    what = ", ".join(x for x in (nd.get("budget"), "every expert" if nd.get("full_model") else None) if x)
    return [f"node {nd['group']}" + (f" ({what})" if what else ""), "pinned", f"{nd['bytes'] / 1e6:.2f}",
            f"{nd['mem_ratio']:.2f}", f"{mean['capture']:.3f}", with_ci(mean["kl"], ci.get("kl")),
            with_ci(mean["agreement"], ci.get("agreement")), with_ci(mean["ppl_ratio"], ci.get("ppl_ratio")),
            f"{worst['ppl_ratio']:.3f}", f"{worst['agreement']:.3f}", "-"]


def onehop_table(r: dict):
    from rich.table import Table

    t = Table(title=f"{r['mode']} routing over the bundle's {r['n_groups']} groups vs full model")
    for col in ("domain", "KL", "agree", "ppl x", "remote share"):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for name, d in r["domains"].items():
        t.add_row(name, f"{d['kl']:.3f}", f"{d['agreement']:.3f}", f"{d['ppl_ratio']:.3f}", f"{d['remote_share']:.2f}")
    mean, ci, worst = r["mean"], r.get("intervals", {}), r["worst"]
    t.add_row("mean", *(with_ci(mean[k], ci.get(k), ".2f" if k == "remote_share" else ".3f")
                        for k in ("kl", "agreement", "ppl_ratio", "remote_share")))
    t.add_row("worst", f"{worst['kl']:.3f}", f"{worst['agreement']:.3f}", f"{worst['ppl_ratio']:.3f}",
              f"{worst['remote_share']:.2f}")
    return t


def write_plot(report: dict, path: str, title: str = "", placement: str = "first"):
    """Quality (worst-domain perplexity ratio) vs memory per node."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxMoeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    placement = placement if any(r["placement"] == placement for r in report["results"]) else report["results"][0]["placement"]
    rows = [r for r in report["results"] if r["placement"] == placement]
    marks = {2: "o", 3: "s", 4: "^"}
    kinds = list(gr.STRATEGIES) + ["other"]
    for r in rows:
        color = f"C{kinds.index(r['strategy']) if r['strategy'] in kinds else len(kinds) - 1}"
        for ax, key in ((axes[0], "ppl_ratio"), (axes[1], "agreement")):
            ax.scatter(r["node_bytes"] / 1e6, r["worst"][key], marker=marks.get(r["n_groups"], "x"), color=color,
                       alpha=0.7, s=28)
    axes[0].set_yscale("log")
    axes[0].axhline(1.10, ls="--", c="k", lw=0.8)
    axes[1].axhline(0.90, ls="--", c="k", lw=0.8)
    axes[0].set_ylabel("worst-domain perplexity ratio (masked / full)")
    axes[1].set_ylabel("worst-domain greedy agreement")
    for ax in axes:
        ax.set_xlabel("memory per node (MB)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=f"C{i}", label=s) for i, s in enumerate(kinds)]
    handles += [Line2D([], [], ls="", marker=mk, color="gray", label=f"{n} groups") for n, mk in marks.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(title or f"masked routing quality vs memory per node (placement: {placement})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
