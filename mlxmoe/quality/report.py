"""The eval report as rich tables and a quality-vs-memory plot."""

from __future__ import annotations

from mlxmoe.errors import MlxMoeError
from mlxmoe.quality import grouping as gr


def table(report: dict, title: str = "masked routing vs full model"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("config", "placement", "MB/node", "x plain", "capture", "KL", "agree", "ppl x", "worst ppl x",
                "worst agree", "regret"):
        t.add_column(col, justify="left" if col in ("config", "placement") else "right")
    for r in report["results"]:
        mean, worst = r["mean"], r["worst"]
        t.add_row(r["config"], r["placement"], f"{r['node_bytes'] / 1e6:.2f}", f"{r['mem_ratio']:.2f}",
                  f"{mean['capture']:.3f}", f"{mean['kl']:.3f}", f"{mean['agreement']:.3f}",
                  f"{mean['ppl_ratio']:.3f}", f"{worst['ppl_ratio']:.3f}", f"{worst['agreement']:.3f}",
                  f"{mean['regret']:.2f}")
    return t


def onehop_table(r: dict):
    from rich.table import Table

    t = Table(title=f"{r['mode']} routing over the bundle's {r['n_groups']} groups vs full model")
    for col in ("domain", "KL", "agree", "ppl x", "remote share"):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for name, d in [*r["domains"].items(), ("mean", r["mean"]), ("worst", r["worst"])]:
        t.add_row(name, f"{d['kl']:.3f}", f"{d['agreement']:.3f}", f"{d['ppl_ratio']:.3f}", f"{d['remote_share']:.2f}")
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
