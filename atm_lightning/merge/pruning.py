"""EViT-style token pruning (Liang et al., ICLR 2022): keep the tokens the class token attends to.

The baseline ATM and ToMe are compared against: instead of merging similar tokens, keep the
``ceil(keep_rate * M)`` unprotected tokens with the highest class-token attention and fuse the rest
into one token, their attention-weighted mean (it keeps their information at the cost of one token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .matching import constant
from .policies import PruningPolicy, integers_at_least


def class_attention(q_cls: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Head-averaged attention of the class token to every token: [B, N], rows sum to 1.

    ``q_cls`` is [B, H, 1, d], ``k`` [B, H, N, d]; ``bias`` the block's additive attention mask
    [B, 1, 1, N]. One batched product with the mask and the scale folded in.
    """
    batch, heads, _, dim = q_cls.shape
    width = k.shape[2]
    q_rows = q_cls.reshape(batch * heads, 1, dim)
    k_cols = k.transpose(-1, -2).reshape(batch * heads, dim, width)
    if bias is None:
        base = constant(0.0, q_rows)
    else:
        base = bias.expand(batch, heads, 1, width).reshape(batch * heads, 1, width)
    logits = torch.baddbmm(base, q_rows, k_cols, alpha=scale)
    return logits.view(batch, heads, width).softmax(dim=-1).mean(dim=1)


def keep_count(keep_rate: float, num_unprotected: int) -> int:
    """Tokens EViT keeps of ``num_unprotected``: ``ceil(keep_rate * M)``, at least one."""
    return max(1, math.ceil(num_unprotected * keep_rate - 1e-9))


def check_keep_rate(keep_rate: float) -> None:
    if not isinstance(keep_rate, (int, float)) or isinstance(keep_rate, bool) or not math.isfinite(keep_rate):
        raise ValueError(f"EViT keep_rate must be a number in (0, 1], got {keep_rate!r}")
    if not 0 < keep_rate <= 1:
        raise ValueError(f"EViT keep_rate must be in (0, 1] (1 keeps every token), got {keep_rate}")


@dataclass(frozen=True, kw_only=True)
class EViT(PruningPolicy):
    """EViT (Liang et al. 2022): in chosen blocks keep the most class-attended tokens, fuse the rest.

    Args:
        keep_rate: fraction of unprotected tokens kept in each pruning block, in (0, 1].
        prune_layers: 1-indexed blocks that prune; default [4, 7, 10] as EViT does for 12-block DeiT.
    """

    name: ClassVar[str] = "evit"
    keep_rate: float = 0.7
    prune_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_keep_rate(self.keep_rate)
        layers = (4, 7, 10) if self.prune_layers is None else tuple(self.prune_layers)
        if not integers_at_least(layers, 1):
            raise ValueError(f"EViT prune_layers are 1-indexed block numbers >= 1, got {self.prune_layers!r}")
        object.__setattr__(self, "keep_rate", float(self.keep_rate))
        object.__setattr__(self, "prune_layers", tuple(sorted(set(layers))))

    @property
    def merges(self) -> bool:
        return self.keep_rate < 1.0 and bool(self.prune_layers)

    def check(self, depth: int) -> None:
        if self.prune_layers and self.prune_layers[-1] > depth:
            raise ValueError(
                f"EViT prune_layers {list(self.prune_layers)} go past the model's {depth} blocks; use 1..{depth}"
            )

    def merges_in(self, layer: int) -> bool:
        return self.keep_rate < 1.0 and layer + 1 in self.prune_layers

    def keep(self, layer: int, num_unprotected: int) -> int | None:
        return keep_count(self.keep_rate, num_unprotected) if layer + 1 in self.prune_layers else None
