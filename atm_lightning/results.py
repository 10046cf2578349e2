"""One evaluation as a machine-readable row: written to ``metrics.json`` and printed as a table.

The row carries everything a number depends on (weights, merge settings, preprocessing, batch
size, devices), so a result can be compared or reproduced without the logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .merge import TokenMerger
from .metrics import FIDELITY_FIELDS
from .runs import unused_path

METRICS_FILE = "metrics.json"


def result_row(
    results: dict[str, Any],
    *,
    stage: str,
    model_name: str,
    weights: str | None,
    pretrained: bool,
    merger: TokenMerger,
    data_config: dict[str, Any],
    batch_size: int,
    world_size: int,
    hflip: bool = False,
) -> dict[str, Any]:
    """Merge an epoch's ``results`` (from ``TokenMergingModule.results``) with its settings."""
    settings = merger.params()
    method = settings.pop("method")
    return {
        "stage": stage,
        "model": model_name,
        "weights": weights if weights is not None else ("timm-pretrained" if pretrained else "random-init"),
        "method": method,
        "merger": settings,
        "batch_size": batch_size,
        "world_size": world_size,
        "img_size": data_config.get("input_size", (None, None, None))[-1],
        "crop_pct": data_config.get("crop_pct"),
        "interpolation": data_config.get("interpolation"),
        "hflip": hflip,
        "num_images": results["num_images"],
        "top1": results["top1"],
        "top5": results["top5"],
        "loss": results["loss"],
        "gflops": results["gflops"],
        "gflops_dense": results["gflops_dense"],
        "gflops_matching": results["gflops_matching"],
        "flops_reduction": results["flops_reduction"],
        "rerun_fraction": results["rerun_fraction"],
        **{key: results[key] for key in FIDELITY_FIELDS},
        "tokens_per_layer": results["tokens_per_layer"],
        "img_per_s": results["img_per_s"],
    }


def write_metrics(row: dict[str, Any], directory: str | Path) -> Path:
    """Write ``row`` as ``<directory>/metrics.json`` (``metrics_N.json`` where an earlier run's
    is there: a run without a logger writes into the working directory) and return the path."""
    path = unused_path(Path(directory) / METRICS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")
    return path


def format_table(row: dict[str, Any]) -> str:
    """A short two-column table of the row, numbers rounded for reading (the JSON keeps them exact)."""
    lines = []
    width = max(len(key) for key in row)
    for key, value in row.items():
        lines.append(f"{key:<{width}}  {_format_value(key, value)}")
    return "\n".join(lines)


def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "not measured (--model.fidelity false)" if key in FIDELITY_FIELDS else "-"
    if key == "top1_change_ci95":
        low, high = value
        return f"[{low:+.2f}, {high:+.2f}] pp (width {high - low:.2f})"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(f"{v:.1f}" for v in value)
    if isinstance(value, float):
        if key in ("top1", "top5", "top1_dense", "agreement"):
            return f"{value:.2f} %"
        if key == "top1_change":
            return f"{value:+.2f} pp"
        if key in ("flops_reduction", "rerun_fraction"):
            return f"{100 * value:.1f} %"
        return f"{value:.4g}"
    return str(value)
