"""Carry out a merge decision: size-weighted means, size sums, source tracking, compaction.

After a merge each image keeps ``[protected tokens, unmerged sources, destinations]`` in that
order (each group in position order), which is ToMe's layout; images that merged fewer pairs are
padded at the end with size-0 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .matching import Matches, Split

# Group codes used to order tokens after a merge; dropped tokens sort last.
_PROTECTED, _UNMERGED_SOURCE, _DESTINATION, _DROPPED = 0, 1, 2, 3


@dataclass(frozen=True)
class Merged:
    """Tokens after one merge step."""

    x: Tensor  # [B, N', C]
    size: Tensor  # [B, N'] float, 0 marks padding
    source: Tensor | None  # [B, N', T0] float, which original patches each token holds
    count: Tensor  # [B] long, real tokens per image


def with_trash_row(t: Tensor) -> Tensor:
    """Append one zero row along dim 1: the slot that non-real split entries point at."""
    pad = t.new_zeros((t.shape[0], 1, *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def _sum_into_destinations(values: Tensor, split: Split, dst_pos: Tensor, selected: Tensor) -> Tensor:
    """Add the rows of selected sources onto their destination rows (values include the trash row)."""
    tail = values.shape[2:]
    src_rows = values.gather(1, _expand(split.a_idx, tail)) * _expand(selected, tail).to(values.dtype)
    return values.scatter_add(1, _expand(dst_pos, tail), src_rows)


def _expand(index: Tensor, tail: tuple[int, ...]) -> Tensor:
    return index.view(*index.shape, *([1] * len(tail))).expand(*index.shape, *tail)


def merge_tokens(
    x: Tensor,
    size: Tensor,
    source: Tensor | None,
    split: Split,
    matches: Matches,
    selected: Tensor,
    num_protected: int,
) -> Merged:
    """Merge each selected source into its matched destination.

    The destination becomes the size-weighted mean of itself and everything merged into it and
    its size the sum, so a token always equals the mean of the patches it stands for.
    Destinations that received nothing are copied unchanged (no ``x*s/s`` rounding).
    """
    batch, n, _ = x.shape
    selected = selected & split.a_ok
    dst_pos = split.b_idx.gather(1, matches.dst)  # [B, Na] destination positions
    dst_pos = torch.where(selected, dst_pos, n)  # unselected sources add nothing, into the trash

    size_t = with_trash_row(size)
    new_size = _sum_into_destinations(size_t, split, dst_pos, selected)
    weighted = _sum_into_destinations(with_trash_row(x * size[..., None]), split, dst_pos, selected)
    received = new_size != size_t
    new_x = torch.where(received[..., None], weighted / new_size.clamp_min(1e-12)[..., None], with_trash_row(x))
    new_source = None
    if source is not None:
        new_source = _sum_into_destinations(with_trash_row(source), split, dst_pos, selected)

    group = torch.full((batch, n + 1), _DROPPED, device=x.device, dtype=torch.long)
    group[:, :num_protected] = _PROTECTED
    group[:, :n][size == 0] = _DROPPED
    # An image that merges nothing keeps its order, exactly as if the step had been skipped for
    # it alone: this is what makes results independent of batch-mates.
    merged_any = selected.any(dim=1, keepdim=True)
    a_group = torch.where(split.a_ok & ~selected, _UNMERGED_SOURCE, _DROPPED)
    b_group = torch.where(split.b_ok, torch.where(merged_any, _DESTINATION, _UNMERGED_SOURCE), _DROPPED)
    group = group.scatter_reduce(1, split.a_idx, a_group, reduce="amin")
    group = group.scatter_reduce(1, split.b_idx, b_group, reduce="amin")
    group[:, n] = _DROPPED

    count = (group < _DROPPED).sum(dim=1)
    keep = int(count.max())
    positions = torch.arange(n + 1, device=x.device)
    order = (group * (n + 1) + positions).argsort(dim=1)[:, :keep]
    real = torch.arange(keep, device=x.device)[None, :] < count[:, None]

    out_size = new_size.gather(1, order) * real
    out_x = new_x.gather(1, _expand(order, new_x.shape[2:])) * real[..., None]
    out_source = None
    if new_source is not None:
        out_source = new_source.gather(1, _expand(order, new_source.shape[2:])) * real[..., None]
    return Merged(out_x, out_size, out_source, count)


def merge_error(x_i: Tensor, x_j: Tensor, n_i: float, n_j: float) -> tuple[Tensor, Tensor]:
    """Both sides of the paper's Theorem 1 for merging two tokens of sizes ``n_i`` and ``n_j``.

    Returns ``(n_i*||X-X_i||^2 + n_j*||X-X_j||^2, n_i*n_j/(n_i+n_j) * ||X_i-X_j||^2)`` with
    ``X`` the size-weighted mean; they are equal, which is why merging two large tokens is costly.
    """
    merged = (n_i * x_i + n_j * x_j) / (n_i + n_j)
    lhs = n_i * (merged - x_i).pow(2).sum(-1) + n_j * (merged - x_j).pow(2).sum(-1)
    rhs = n_i * n_j / (n_i + n_j) * (x_i - x_j).pow(2).sum(-1)
    return lhs, rhs
