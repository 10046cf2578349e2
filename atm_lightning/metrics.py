"""What one evaluation stage accumulates: accuracy, FLOPs, tokens, timing and fidelity to dense.

Everything is a sum (or torchmetrics' accuracy counts), so under DDP the epoch's numbers are
exactly those of one device: torchmetrics adds the ranks' states at the end of the epoch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .fidelity import compare_batch, summary

FIDELITY_SUMS = ("agree", "kl", "dense_right", "lost", "gained")


class Float64Sum(Metric):
    """Sum of tensors of a fixed shape, kept in float64.

    torchmetrics' SumMetric flattens vectors to a scalar and casts inputs to float32 after
    ``module.to(device)``; summing 50k images in float32 loses digits the results report.
    """

    full_state_update = False

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor) -> None:
        self.total += value.to(self.total)

    def compute(self) -> Tensor:
        return self.total


class EvalMetrics(nn.Module):
    """Epoch accumulators of one evaluation stage (validate or test); ``fidelity``: every batch
    comes with the unmerged model's outputs to compare with."""

    def __init__(self, num_classes: int, depth: int, fidelity: bool = True) -> None:
        super().__init__()
        self.accuracy = MetricCollection(
            {
                f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
                for k in (1, 5)
            }
        )
        names = ("num_images", "loss", "gflops", "gflops_matching", "flops_reduction", "rerun", "seconds")
        self.sums = MetricCollection({name: Float64Sum() for name in names + (FIDELITY_SUMS if fidelity else ())})
        self.tokens = Float64Sum((depth + 1,))
        self.gflops_dense = math.nan
        self.fidelity = fidelity
        self.predictions: list[Tensor] = []  # top-1 classes of this process's images, in order
        self.targets: list[Tensor] = []

    def update(
        self, logits: Tensor, targets: Tensor, seconds: float, stats: Any, dense_logits: Tensor | None
    ) -> None:
        """One batch; ``dense_logits`` are the unmerged model's on the same images (needed with ``fidelity``)."""
        self.accuracy.update(logits, targets)
        self.predictions.append(logits.argmax(-1).cpu())
        self.targets.append(targets.cpu())
        # In the per-image values' precision, so that a dense image saves exactly 0.
        dense = stats.gflops.new_tensor(stats.gflops_dense)
        sums = {
            "num_images": torch.tensor(len(targets)),
            "loss": F.cross_entropy(logits.double(), targets, reduction="sum"),
            "gflops": stats.gflops.double().sum(),
            "gflops_matching": stats.gflops_matching.double().sum(),
            # Summed per image: 1 - mean/dense would round a dense run to -2.2e-16 ("-0.0 %").
            "flops_reduction": (1.0 - stats.gflops / dense).double().sum(),
            "rerun": torch.tensor(0) if stats.rerun is None else stats.rerun.sum(),
            "seconds": torch.tensor(seconds),
        }
        if self.fidelity:
            if dense_logits is None:
                raise ValueError("EvalMetrics(fidelity=True) needs the unmerged model's logits of every batch")
            sums |= compare_batch(logits, dense_logits, targets)
        for name, value in sums.items():
            self.sums[name].update(value)
        self.tokens.update(stats.tokens.sum(0))
        self.gflops_dense = dense.item()

    def compute(self) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Collect (and, under DDP, sync) the epoch into plain Python numbers, then reset.

        Also returns this process's predictions and labels (not synced: under DDP each rank has
        its share). Fidelity fields are None without ``fidelity``.
        """
        accuracy = self.accuracy.compute()
        sums = {name: float(value) for name, value in self.sums.compute().items()}
        tokens = self.tokens.compute()
        predictions, targets = _cat(self.predictions), _cat(self.targets)
        self.accuracy.reset()
        self.sums.reset()
        self.tokens.reset()
        self.predictions, self.targets = [], []
        images = sums["num_images"]
        gflops = sums["gflops"] / images
        results = {
            "num_images": int(images),
            "top1": 100 * float(accuracy["top1"]),
            "top5": 100 * float(accuracy["top5"]),
            "loss": sums["loss"] / images,
            "gflops": gflops,
            "gflops_dense": self.gflops_dense,
            "gflops_matching": sums["gflops_matching"] / images,
            "flops_reduction": sums["flops_reduction"] / images,
            "rerun_fraction": sums["rerun"] / images,  # images run again unmerged (rerun_margin)
            "tokens_per_layer": (tokens / images).tolist(),
            "img_per_s": images / sums["seconds"] if sums["seconds"] > 0 else math.nan,
        }
        fidelity = summary(sums, int(images)) if self.fidelity else dict.fromkeys(FIDELITY_FIELDS)
        return results | fidelity, predictions, targets


FIDELITY_FIELDS = ("top1_dense", "top1_change", "top1_change_ci95", "lossless", "agreement", "kl")  # in display order


def _cat(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.long)
