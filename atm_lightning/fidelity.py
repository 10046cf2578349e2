"""How far merging moves a model's predictions: agreement, KL and a paired interval of the top-1 change.

Top-1 on a thousand images moves by about half a point by chance when a few percent of the
predictions change, so one count cannot show that a setting is lossless. Each image is compared
with the unmerged model on the same input: whether the top-1 class is the same (agreement), the
KL divergence of the merged output from the unmerged one, and whether it was right before and
after. The paired bootstrap then resamples images and reads the 2.5 and 97.5 percentiles of the
top-1 change. Per image that change is -1 (right before, wrong after), +1 or 0, so the bootstrap
depends on three counts only: resampling ``n`` images is one multinomial draw of them. The
interval is therefore the same on one device or many, in any image order. A setting is called
lossless here when that interval contains 0, and the interval's width says how much that means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BOOTSTRAP_DRAWS = 10_000


@dataclass(frozen=True)
class Top1Change:
    """Top-1 change of the merged model (points), with its 95% paired-bootstrap interval."""

    change: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def lossless(self) -> bool:
        """The interval contains 0: no change in top-1 that these images can show."""
        return self.low <= 0.0 <= self.high


def top1_change(lost: int, gained: int, total: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Top1Change:
    """The paired bootstrap of the top-1 change among ``total`` images, of which ``lost`` were
    right without merging and wrong with it, and ``gained`` the reverse."""
    if total < 1:
        raise ValueError("the top-1 change needs at least one image")
    if lost < 0 or gained < 0 or lost + gained > total:
        raise ValueError(f"counts must satisfy 0 <= lost + gained <= total, got {lost}, {gained}, {total}")
    generator = torch.Generator().manual_seed(seed)
    n = torch.full((draws,), float(total), dtype=torch.float64)
    # Multinomial resampling of (lost, gained, same) as two chained binomial draws.
    lost_draws = torch.binomial(n, torch.full_like(n, lost / total), generator=generator)
    p_gained = gained / (total - lost) if total > lost else 0.0
    gained_draws = torch.binomial(n - lost_draws, torch.full_like(n, p_gained), generator=generator)
    change = (gained_draws - lost_draws) / total
    low, high = torch.quantile(change, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Top1Change(100 * (gained - lost) / total, 100 * low, 100 * high)


def compare_batch(logits: Tensor, dense_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-batch sums comparing merged to unmerged outputs: images whose top-1 class agrees,
    KL(unmerged || merged) in nats, images the unmerged model got right, and those lost/gained."""
    merged = F.log_softmax(logits.double(), dim=-1)
    dense = F.log_softmax(dense_logits.double(), dim=-1)
    prediction, dense_prediction = merged.argmax(-1), dense.argmax(-1)
    right, dense_right = prediction == targets, dense_prediction == targets
    return {
        "agree": (prediction == dense_prediction).sum(),
        "kl": (dense.exp() * (dense - merged)).sum(),
        "dense_right": dense_right.sum(),
        "lost": (dense_right & ~right).sum(),
        "gained": (right & ~dense_right).sum(),
    }


def summary(sums: dict[str, float], images: int) -> dict[str, object]:
    """The fidelity fields of a result row from an epoch's sums (see :func:`compare_batch`)."""
    change = top1_change(round(sums["lost"]), round(sums["gained"]), images)
    return {
        "top1_dense": 100 * sums["dense_right"] / images,
        "agreement": 100 * sums["agree"] / images,
        "kl": sums["kl"] / images,
        "top1_change": change.change,
        "top1_change_ci95": [change.low, change.high],
        "lossless": change.lossless,
    }
