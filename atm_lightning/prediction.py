"""``atm predict``: one row per image, for the question "which images did merging change, and how
sure was the model?".

Each row holds the image's path and label (empty when the folder gives none), the five most
probable classes with their probabilities, the gap between the two largest (what ``rerun_margin``
compares), the unmerged model's top-1 class and probability beside it (with ``fidelity``) and
whether merging changed the top-1, the tokens the image ended with, its GFLOPs and whether it
ran again unmerged. Under DDP every rank predicts its whole batches (the exact evaluation
sampler), the rows are gathered to the first rank and written once, in dataset order: the file
is the same on one device or several.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from .patch import MergeStats
from .runs import check_new_file, unused_path
from .user_errors import CommandError

FORMATS = (".csv", ".jsonl")
DEFAULT_NAME = "predictions.csv"
TOP_K = 5
COLUMNS = (
    "path", "label", "top1", "top1_prob", "top2_gap", "top5", "top5_prob",
    "dense_top1", "dense_top1_prob", "changed", "tokens", "gflops", "rerun",
)  # fmt: skip


def check_output_name(path: Path) -> None:
    if path.suffix not in FORMATS:
        raise ValueError(f"--output {path} must end in {' or '.join(FORMATS)}")


def batch_record(
    logits: Tensor, dense_logits: Tensor | None, stats: MergeStats, labels: Tensor, index: Tensor
) -> dict[str, Tensor | None]:
    """The per-image values of one batch, as CPU tensors (``dense_logits`` None: not measured)."""
    probs = F.softmax(logits.double(), dim=-1)
    top = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
    second = top.values[:, 1] if top.values.shape[1] > 1 else torch.zeros_like(top.values[:, 0])
    record = {
        "index": index,
        "label": labels,
        "top_class": top.indices,
        "top_prob": top.values,
        "top2_gap": top.values[:, 0] - second,
        "tokens": stats.final_tokens,
        "gflops": stats.gflops,
        "rerun": stats.rerun,
        "dense_top1": None,
        "dense_top1_prob": None,
    }
    if dense_logits is not None:
        dense = F.softmax(dense_logits.double(), dim=-1).max(dim=-1)
        record |= {"dense_top1": dense.indices, "dense_top1_prob": dense.values}
    return {key: None if value is None else value.detach().cpu() for key, value in record.items()}


def rows_of(record: dict[str, Tensor | None], paths: list[Path]) -> list[dict[str, Any]]:
    """One plain row per image of a batch record (``paths`` indexed by dataset position)."""
    rows = []
    for i, index in enumerate(record["index"].tolist()):
        label = int(record["label"][i])
        top1 = int(record["top_class"][i, 0])
        row = {
            "index": index,
            "path": str(paths[index]),
            "label": label if label >= 0 else None,
            "top1": top1,
            "top1_prob": _round(record["top_prob"][i, 0]),
            "top2_gap": _round(record["top2_gap"][i]),
            "top5": record["top_class"][i].tolist(),
            "top5_prob": [_round(p) for p in record["top_prob"][i]],
            "dense_top1": None,
            "dense_top1_prob": None,
            "changed": None,
            "tokens": int(record["tokens"][i]),
            "gflops": _round(record["gflops"][i]),
            "rerun": record["rerun"] is not None and bool(record["rerun"][i]),
        }
        if record["dense_top1"] is not None:
            dense = int(record["dense_top1"][i])
            row |= {"dense_top1": dense, "dense_top1_prob": _round(record["dense_top1_prob"][i]), "changed": dense != top1}
        rows.append(row)
    return rows


def _round(value: Tensor) -> float:
    return round(float(value), 6)


class PredictionWriter(Callback):
    """Collect :meth:`.TokenMergingModule.predict_step` records, write them once, print a summary.

    Args:
        output: ``.csv`` or ``.jsonl`` file; None: ``predictions.csv`` in the run's log folder
            (a free name where that folder is not the run's own).
        overwrite: replace ``output`` if it exists (otherwise an existing file is an error, here).
    """

    def __init__(self, output: str | Path | None = None, overwrite: bool = False) -> None:
        self.output = None if output is None else Path(output)
        if self.output is not None:  # before any image is read
            check_output_name(self.output)
            check_new_file(self.output, overwrite, example=DEFAULT_NAME)
        self.rows: list[dict[str, Any]] = []
        self.path: Path | None = None
        self.paths: list[Path] = []  # of the predicted dataset, by position

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.output is None:
            self.path = unused_path(Path(log_dir if log_dir is not None else trainer.default_root_dir) / DEFAULT_NAME)
        else:
            self.path = self.output
        self.rows, self.paths = [], []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.paths:
            self.paths = [path for path, _ in trainer.predict_dataloaders.dataset.samples]
        self.rows += rows_of(outputs, self.paths)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = gathered(self.rows)
        self.rows = []
        if not trainer.is_global_zero:
            return
        rows.sort(key=lambda row: row["index"])
        expected = len(trainer.predict_dataloaders.dataset)
        if [row["index"] for row in rows] != list(range(expected)):
            raise CommandError(
                f"predicted {len(rows)} rows for {expected} images: a sampler padded or dropped images, or "
                f"limit_predict_batches or fast_dev_run is set; these predictions are not the whole set"
            )
        print(summary(rows))  # before writing: what cannot be written is still shown
        assert self.path is not None
        write_rows(rows, self.path)
        print(f"wrote {len(rows)} rows to {self.path}")


def gathered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows (on every rank) under DDP; this process's alone otherwise."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(rows)
    parts: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part or []]


def summary(rows: list[dict[str, Any]]) -> str:
    """Images, how many merging changed, mean GFLOPs and tokens, reruns, and top-1 where labelled."""
    count = len(rows)
    lines = [f"{count} images: mean {sum(r['gflops'] for r in rows) / count:.4g} GFLOPs, "
             f"{sum(r['tokens'] for r in rows) / count:.1f} tokens at the end, "
             f"{sum(r['rerun'] for r in rows)} ran again unmerged"]  # fmt: skip
    compared = [r for r in rows if r["changed"] is not None]
    if compared:
        lines.append(f"merging changed the top-1 class of {sum(r['changed'] for r in compared)} of {len(compared)}")
    labelled = [r for r in rows if r["label"] is not None]
    if labelled:
        right = sum(r["top1"] == r["label"] for r in labelled)
        lines.append(f"top-1 {100 * right / len(labelled):.2f}% on {len(labelled)} labelled images")
    return "\n".join(lines)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """CSV (lists as space-separated values, empty cells: not known) or JSON lines, in COLUMNS order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{key: row[key] for key in COLUMNS} for row in rows]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows({key: _cell(value) for key, value in record.items()} for record in records)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return value
