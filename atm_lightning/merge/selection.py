"""Which matched sources actually merge: a fixed count (ToMe) or a similarity threshold (ATM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .matching import Matches, Split


@dataclass(frozen=True)
class MatchContext:
    """What a matching policy sees when it chooses the sources that merge in one block.

    The merge step builds it after matching. A selection rule that needs more than the
    similarities reads it from here, so adding one changes this object rather than the
    signature of every policy.
    """

    layer: int  # 0-indexed block
    split: Split
    matches: Matches
    size: Tensor  # [B, W] tokens' sizes (patches each stands for), 0 on padding
    free: Tensor | int  # tokens per image that may merge ([B]), or one int when no image is padded

    def real_rows(self) -> Tensor | None:
        """[B, Na] bool: source rows that are real tokens of their image; None when all are."""
        split = self.split
        if split.row_ok is not None or not isinstance(self.free, Tensor):
            return split.row_ok
        return split.take(self.size)[0] > 0


def layer_threshold(alpha: float, beta: float, theta_min: float, layer: int) -> float:
    """ATM's threshold of block ``layer`` (1-indexed): ``max(alpha - (exp(beta*(l-1)) - 1), theta_min)``.

    Early blocks get the strictest threshold because merging there discards the most information.
    """
    return max(alpha - (math.exp(beta * (layer - 1)) - 1.0), theta_min)


def threshold_schedule(alpha: float, beta: float, theta_min: float, depth: int) -> list[float]:
    """Thresholds of blocks 1..depth, returned 0-indexed."""
    return [layer_threshold(alpha, beta, theta_min, layer) for layer in range(1, depth + 1)]


def top_r(score: Tensor, r: Tensor | int) -> Tensor:
    """Mask of the ``r`` best-scoring sources per image (``r`` one int, or a tensor per image [B] or
    for the whole batch); ties are broken like ToMe's ``argsort(descending=True)``."""
    order = score.argsort(dim=-1, descending=True)
    if isinstance(r, int):  # the first r of every image's order: no ranks needed
        return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order[..., :r], True)
    rank = order.argsort(dim=-1)
    return rank < (r[:, None] if r.dim() == 1 else r)


def above_threshold(score: Tensor, theta: float) -> Tensor:
    """Mask of sources whose best match scores strictly above ``theta``."""
    return score > theta


def batch_min(selected: Tensor, score: Tensor) -> Tensor:
    """The paper's batch-adaptive rule: every image merges ``min_i c_i`` pairs, its best ones.

    Each chosen pair is above the threshold, because ``c_i`` counts exactly those pairs.
    """
    return top_r(score, selected.sum(dim=-1).min())
