"""The rows of ``atm compare``: the table, the CSV they round-trip through, and ``--merge``,
which combines the CSVs of earlier runs on the same images."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One evaluated method, as it appears in the table and the CSV."""

    method: str
    family: str
    params: str
    gflops: float
    reduction_pct: float
    top1: float
    top5: float
    agreement_pct: float | None  # top-1 class unchanged from the dense row
    top1_change: float | None  # points, against the dense row on the same images
    ci_low: float | None  # 95% paired-bootstrap interval of top1_change
    ci_high: float | None
    lossless: bool | None  # the interval contains 0
    kl: float | None  # mean KL(unmerged || merged), nats per image
    img_per_s: float
    num_images: int
    batch_size: int
    pareto: bool
    metrics: str  # the run's metrics.json


def merge_tables(paths: list[Path]) -> list[Row]:
    """The rows of several compare.csv files on the same images, dense first, Pareto front redone.

    A later file's row replaces an earlier one of the same label (rows labelled by their family
    alone, as inline methods are, also by their params). Files whose image count or dense top-1
    differ were not measured on the same images: an error naming each file's.
    """
    rows: dict[tuple[str, str], Row] = {}
    references: dict[Path, tuple[int, float]] = {}  # each file's dense row: its image count and top-1
    counts: dict[int, str] = {}  # image counts of every row, with one row that has it
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--merge {path} does not exist; pass compare.csv files of earlier runs")
        with path.open(newline="") as file:
            for record in csv.DictReader(file):
                row = row_from_csv(record)
                rows[(row.method, row.params if row.method == row.family else "")] = row
                counts.setdefault(row.num_images, f"{row.method} in {path}")
                if row.family == "dense":
                    references[path] = (row.num_images, round(row.top1, 6))
    if not references:
        raise ValueError("--merge needs a dense row, the reference every row is measured against; add a compare.csv that has one")
    if len(set(references.values())) > 1 or len(counts) > 1:
        each = "; ".join(f"{path}: {n} images, dense top-1 {top1:.2f}%" for path, (n, top1) in references.items())
        other = [f"{where} ({n} images)" for n, where in counts.items() if n not in {c for c, _ in references.values()}]
        raise ValueError(
            f"--merge needs files measured on the same images (same image count and dense top-1), but {each}"
            + (f"; also {', '.join(other)}" if other else "")
            + "; merge only the runs made on one image set"
        )
    dense = [r for r in rows.values() if r.family == "dense"]
    merged = [dense[0], *(r for r in rows.values() if r.family != "dense")]
    check_made_alike(merged)
    front = pareto_front([(r.gflops, r.top1) for r in merged])
    return [replace(r, pareto=i in front) for i, r in enumerate(merged)]


# What each row's metrics.json records of how it ran that must be one value in a merged table
# (the weights for dense rows only: a fine-tuned checkpoint row has its own).
MADE_ALIKE = ("model", "img_size", "crop_pct", "interpolation", "hflip")


def check_made_alike(rows: list[Row]) -> None:
    """Refuse rows that ran with another batch size or preprocessing: their throughput, or their
    top-1 on the same images, would not compare. Rows whose metrics.json is gone are checked on
    their batch size alone."""
    seen: dict[str, dict[Any, str]] = {}
    for row in rows:
        settings: dict[str, Any] = {"batch_size": row.batch_size}
        metrics = Path(row.metrics)
        if metrics.is_file():
            recorded = json.loads(metrics.read_text())
            keys = (*MADE_ALIKE, "weights") if row.family == "dense" else MADE_ALIKE
            settings |= {key: recorded.get(key) for key in keys}
        for key, value in settings.items():
            seen.setdefault(key, {}).setdefault(json.dumps(value), row.method)
    differ = {key: values for key, values in seen.items() if len(values) > 1}
    if differ:
        detail = "; ".join(
            f"{key} " + ", ".join(f"{value} ({method})" for value, method in values.items())
            for key, values in differ.items()
        )
        raise ValueError(f"--merge needs runs made alike, but they differ in {detail}; rerun the odd ones alike")


def row_from_csv(record: dict[str, str]) -> Row:
    """A :class:`Row` from its CSV line (empty cells: not measured)."""
    values: dict[str, Any] = {}
    for name, kind in ((f.name, f.type) for f in fields(Row)):
        text = record[name]
        if "bool" in kind:
            values[name] = None if text == "" else text == "True"
        elif "float" in kind:
            values[name] = None if text == "" else float(text)
        elif "int" in kind:
            values[name] = int(text)
        else:
            values[name] = text
    return Row(**values)


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of (gflops, top1) points that no other point beats on both (fewer FLOPs, more top-1)."""
    return {
        i
        for i, (g, t) in enumerate(points)
        if not any(g2 <= g and t2 >= t and (g2, t2) != (g, t) for g2, t2 in points)
    }


def markdown_table(rows: list[Row]) -> str:
    lines = [
        f"{rows[0].num_images} images, batch size {rows[0].batch_size}; top-1 change against dense with its 95% "
        "paired-bootstrap interval; KL to the unmerged model (nats); * = on the Pareto front (top-1 vs GFLOPs)",
        "",
        "| method | params | GFLOPs | reduction | top-1 | change [95% CI] | agreement | KL | top-5 | img/s | |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        agreement = "n/a" if r.agreement_pct is None else f"{r.agreement_pct:.1f}%"
        change = "n/a" if r.top1_change is None else f"{r.top1_change:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        kl = "n/a" if r.kl is None else f"{r.kl:.4f}"
        lines.append(
            f"| {r.method} | {r.params} | {r.gflops:.4g} | {r.reduction_pct:.1f}% | {r.top1:.2f} | {change} | "
            f"{agreement} | {kl} | {r.top5:.2f} | {r.img_per_s:.1f} | {'*' if r.pareto else ''} |"
        )
    return "\n".join(lines)
