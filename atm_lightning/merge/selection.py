"""Which matched sources actually merge: a fixed count (ToMe) or a similarity threshold (ATM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .matching import Matches, Split, with_trash_row


@dataclass(frozen=True)
class MatchContext:
    """What a matching policy sees when it chooses the sources that merge in one block.

    The block loop builds it after matching. A selection rule that needs more than the
    similarities (token sizes, the class token's attention) reads it from here, so adding one
    changes this object rather than the signature of every policy.
    """

    layer: int  # 0-indexed block
    split: Split
    matches: Matches
    size: Tensor  # [B, N] tokens' sizes (patches each stands for), 0 on padding
    num_unprotected: Tensor  # [B] real tokens per image that may merge
    class_attention: Tensor | None = None  # [B, N] the class token's attention (policies that ask)

    def slot_sizes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Sizes of the source slots [B, Na], the destination slots [B, Nb] and of each source's
        best destination [B, Na]; 0 where a slot is not real."""
        sizes = with_trash_row(self.size)
        split = self.split
        dst_pos = split.b_idx.gather(1, self.matches.dst)
        return (
            sizes.gather(1, split.a_idx) * split.a_ok,
            sizes.gather(1, split.b_idx) * split.b_ok,
            sizes.gather(1, dst_pos) * split.a_ok,
        )


def layer_threshold(alpha: float, beta: float, theta_min: float, layer: int) -> float:
    """ATM's threshold of block ``layer`` (1-indexed): ``max(alpha - (exp(beta*(l-1)) - 1), theta_min)``.

    Early blocks get the strictest threshold because merging there discards the most information.
    """
    return max(alpha - (math.exp(beta * (layer - 1)) - 1.0), theta_min)


def threshold_schedule(alpha: float, beta: float, theta_min: float, depth: int) -> list[float]:
    """Thresholds of blocks 1..depth, returned 0-indexed."""
    return [layer_threshold(alpha, beta, theta_min, layer) for layer in range(1, depth + 1)]


def top_r(similarity: Tensor, r: Tensor | int) -> Tensor:
    """Mask of the ``r`` best-scoring sources per image (``r`` scalar or per image [B]).

    Ties are broken like ToMe's ``argsort(descending=True)``; slots scoring ``-inf`` (not real)
    are never chosen.
    """
    order = similarity.argsort(dim=-1, descending=True)
    if isinstance(r, int):  # the first r of every image's order: no ranks needed
        chosen = torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, order[..., :r], True)
        return chosen & _finite(similarity)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    r = torch.as_tensor(r, device=similarity.device)
    if r.dim() == 1:
        r = r[:, None]
    return (rank < r) & _finite(similarity)


def _finite(t: Tensor) -> Tensor:
    """``torch.isfinite(t)`` in two ops instead of six: NaN and both infinities compare false."""
    return t.abs() < math.inf


def above_threshold(similarity: Tensor, theta: float) -> Tensor:
    """Mask of sources whose best match is strictly more similar than ``theta``."""
    return similarity > theta


def batch_min(selected: Tensor, similarity: Tensor) -> Tensor:
    """The paper's batch-adaptive rule: every image merges ``min_i c_i`` pairs, its best ones.

    Each chosen pair is above the threshold, because ``c_i`` counts exactly those pairs.
    """
    count = selected.sum(dim=-1).min()
    return top_r(similarity, count)
