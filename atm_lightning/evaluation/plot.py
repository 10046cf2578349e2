"""The picture of a comparison: top-1 change (with its interval) and agreement against GFLOPs, one curve per family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLOURS = {
    "dense": "black",
    "NoMerge": "black",
    "ToMe": "tab:blue",
    "ATM": "tab:red",
    "EViT": "tab:orange",
    "ToMe + rerun": "tab:cyan",
    "ATM + rerun": "tab:purple",
    "EViT + rerun": "tab:brown",
    "checkpoint": "tab:green",
    "distilled": "tab:olive",
}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "the plot needs matplotlib: pip install 'atm-lightning[plot]' (or pass --no-plot for table and CSV only)"
        ) from None


def plot(rows: Sequence[Any], path: Path) -> None:
    """Two panels against GFLOPs: the top-1 change from dense with its 95% interval, and the
    agreement with dense; one curve per family (points in order of GFLOPs), checkpoints as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (change_ax, agree_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    for family, colour in COLOURS.items():
        members = sorted((r for r in rows if r.family == family), key=lambda r: r.gflops)
        members = [r for r in members if r.top1_change is not None]
        if not members:
            continue
        style = "o" if family in ("checkpoint", "distilled", "dense", "NoMerge") else "-o"
        gflops = [r.gflops for r in members]
        errors = [[r.top1_change - r.ci_low for r in members], [r.ci_high - r.top1_change for r in members]]
        change_ax.errorbar(
            gflops, [r.top1_change for r in members], yerr=errors, fmt=style, color=colour, capsize=3, label=family
        )
        agree_ax.plot(gflops, [r.agreement_pct for r in members], style, color=colour, label=family)
        for r in members:
            agree_ax.annotate(r.method, (r.gflops, r.agreement_pct), textcoords="offset points", xytext=(4, 4), fontsize=7)
    change_ax.axhline(0.0, color="grey", linewidth=0.8)
    change_ax.set_ylabel("top-1 change from dense (points, 95% CI)")
    agree_ax.set_ylabel("top-1 agreement with dense (%)")
    for ax in (change_ax, agree_ax):
        ax.set_xlabel("GFLOPs per image (multiply-adds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0].num_images} images, batch {rows[0].batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
