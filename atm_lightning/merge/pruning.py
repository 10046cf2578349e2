"""EViT-style token pruning (Liang et al., ICLR 2022): keep the tokens the class token attends to.

The baseline ATM and ToMe are compared against: instead of merging similar tokens, keep the
``ceil(keep_rate * M)`` unprotected tokens with the highest class-token attention and fuse the rest
into one token, their attention-weighted mean (it keeps their information at the cost of one token).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .merging import Merged


def class_attention(q_cls: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Head-averaged attention of the class token to every token: [B, N], rows sum to 1.

    ``q_cls`` is [B, H, 1, d], ``k`` [B, H, N, d]; ``bias`` the block's additive attention mask.
    """
    batch, heads, _, dim = q_cls.shape
    # matmul's own batched product, without its expand/reshape ops around it (one ``bmm``).
    q_rows, k_cols = (q_cls * scale).reshape(batch * heads, 1, dim), k.transpose(-1, -2).reshape(batch * heads, dim, -1)
    logits = torch.bmm(q_rows, k_cols).view(batch, heads, 1, -1)  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1).view(batch, -1)


def keep_count(keep_rate: float, num_unprotected: Tensor) -> Tensor:
    """Tokens EViT keeps per image: ``ceil(keep_rate * M)``."""
    return torch.ceil(num_unprotected.double() * keep_rate - 1e-9).long().clamp(min=1)


def prune_inattentive(
    x: Tensor,
    size: Tensor,
    source: Tensor | None,
    attention: Tensor,
    keep: Tensor,
    num_protected: int,
    fuse: bool = True,
) -> Merged:
    """Keep the ``keep`` [B] most attended unprotected tokens; fuse the others into one token.

    Output per image: ``[protected, kept (position order), fused]``, padded with size-0 tokens.
    The fused token is the attention-weighted mean of the pruned tokens; its size is the sum of
    theirs, so proportional attention and size-weighted pooling still count what it stands for.
    """
    batch, n, channels = x.shape
    positions = torch.arange(n, device=x.device)
    body = (size > 0) & (positions >= num_protected)
    score = attention.masked_fill(~body, float("-inf"))
    order = score.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, -1))
    kept = body & (rank < keep[:, None])
    pruned = body & ~kept

    keep_mask = kept | ((positions < num_protected) & (size > 0))
    count = keep_mask.sum(dim=1) + (pruned.any(dim=1) & fuse).long()
    width = int(count.max())
    # Kept tokens first in position order, then the rest; the fused token takes slot ``count-1``.
    slot_order = (positions + (~keep_mask).long() * n).argsort(dim=1)[:, :width]
    real_kept = torch.arange(width, device=x.device).expand(batch, -1) < keep_mask.sum(dim=1, keepdim=True)

    out_x = x.gather(1, slot_order[..., None].expand(-1, -1, channels)) * real_kept[..., None]
    out_size = size.gather(1, slot_order) * real_kept
    out_source = None
    if source is not None:
        out_source = source.gather(1, slot_order[..., None].expand(-1, -1, source.shape[-1]))
        out_source = out_source * real_kept[..., None]
    pruned_tokens = Merged(out_x, out_size, out_source, count)
    return _fuse_pruned(pruned_tokens, x, size, source, attention, pruned) if fuse else pruned_tokens


def _fuse_pruned(out: Merged, x: Tensor, size: Tensor, source: Tensor | None, attention: Tensor, pruned: Tensor) -> Merged:
    """Put the attention-weighted mean of each image's pruned tokens after its kept ones."""
    rows = pruned.any(dim=1).nonzero().squeeze(1)
    slot = (rows, out.count[rows] - 1)  # the fused token follows the kept ones
    weight = (attention * pruned).to(x.dtype)  # [B, N]
    fused = (weight[..., None] * x).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-12)
    out_x = out.x.index_put(slot, fused[rows])
    out_size = out.size.index_put(slot, (size * pruned).sum(1)[rows])
    out_source = out.source
    if out_source is not None:
        fused_source = (source * pruned[..., None].to(source.dtype)).sum(1)
        out_source = out_source.index_put(slot, fused_source[rows])
    return Merged(out_x, out_size, out_source, out.count)


def check_keep_rate(keep_rate: float) -> None:
    if not isinstance(keep_rate, (int, float)) or isinstance(keep_rate, bool) or not math.isfinite(keep_rate):
        raise ValueError(f"EViT keep_rate must be a number in (0, 1], got {keep_rate!r}")
    if not 0 < keep_rate <= 1:
        raise ValueError(f"EViT keep_rate must be in (0, 1] (1 keeps every token), got {keep_rate}")
