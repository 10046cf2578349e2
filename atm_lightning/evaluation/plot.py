"""The picture of a comparison: top-1 against GFLOPs, one colour per family, the Pareto front."""

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
    "checkpoint": "tab:green",
}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "the plot needs matplotlib: pip install 'atm-lightning[plot]' (or pass --no-plot for table and CSV only)"
        ) from None


def plot(rows: Sequence[Any], path: Path) -> None:
    """Top-1 against GFLOPs of compare's rows, one colour per family, the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, colour in COLOURS.items():
        members = [r for r in rows if r.family == family]
        if members:
            ax.plot([r.gflops for r in members], [r.top1 for r in members], "o", color=colour, label=family)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.gflops)
    ax.plot(
        [r.gflops for r in front], [r.top1 for r in front], "--o", color="grey", markerfacecolor="none",
        markersize=12, label="Pareto front",
    )
    for r in rows:
        ax.annotate(r.method, (r.gflops, r.top1), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GFLOPs per image (multiply-adds)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{rows[0].num_images} images, batch {rows[0].batch_size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
