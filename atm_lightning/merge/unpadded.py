"""Splits and merges for batches without padding: every image holds all its slots.

Before the first merge every batch is like that, and a single image always is. The index work of
:func:`.matching.alternating_split` and :func:`.merging.merge_tokens` then shrinks to a few ops:
no masks of real slots, no per-image bookkeeping. At batch 1 on a CPU, where each block's merge
step costs more in op overhead than in arithmetic, this is most of the difference between
merging being slower or faster than the dense model. Results equal the general functions' bit
for bit (the same products, the same additions in the same order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matching import Matches, Split
from .merging import Merged

_ALTERNATING: dict[tuple[int, int, int, torch.device], Split] = {}


def full_alternating_split(batch: int, n: int, num_protected: int, device: torch.device) -> Split:
    """:func:`.matching.alternating_split` of ``batch`` images of ``n`` real tokens (made once per shape)."""
    key = (batch, n, num_protected, device)
    if key not in _ALTERNATING:
        with torch.inference_mode(False):  # usable by forwards that record gradients, too
            _ALTERNATING[key] = _alternating(batch, n, num_protected, device)
    return _ALTERNATING[key]


def _alternating(batch: int, n: int, num_protected: int, device: torch.device) -> Split:
    a_slice = slice(num_protected + num_protected % 2, n, 2)
    b_slice = slice(num_protected + (num_protected + 1) % 2, n, 2)
    a_pos = torch.arange(n, device=device)[a_slice].expand(batch, -1)
    b_pos = torch.arange(n, device=device)[b_slice].expand(batch, -1)
    a_ok = torch.ones(a_pos.shape, device=device, dtype=torch.bool)
    b_ok = torch.ones(b_pos.shape, device=device, dtype=torch.bool)
    return Split(a_pos, a_ok, b_pos, b_ok, a_slice, b_slice, all_real=True)


def full_size_sorted_split(size: Tensor, num_protected: int) -> Split:
    """:func:`.matching.size_sorted_split` of images whose tokens are all real (``size > 0``)."""
    batch, n = size.shape
    order = torch.sort(size[:, num_protected:], dim=1, stable=True).indices + num_protected
    num_a = (n - num_protected + 1) // 2
    a_idx, b_idx = order[:, :num_a], order[:, num_a:]
    a_ok = torch.ones(a_idx.shape, device=size.device, dtype=torch.bool)
    b_ok = torch.ones(b_idx.shape, device=size.device, dtype=torch.bool)
    return Split(a_idx, a_ok, b_idx, b_ok, all_real=True)


def merge_single_image(
    x: Tensor,
    size: Tensor,
    split: Split,
    matches: Matches,
    selected: Tensor,
    num_protected: int,
    keep_norm: bool = False,
) -> Merged | None:
    """:func:`.merging.merge_tokens` for one image without padding ([1, N, C], ``split.all_real``),
    without source tracking; None when nothing merges.

    Output tokens are ``[protected, unmerged sources, destinations]``, each group in position
    order; destinations that took in sources become the size-weighted mean of their parts.
    """
    slot = selected.view(-1).nonzero().view(-1)  # merged sources, in slot order (as merge_tokens pairs them)
    if len(slot) == 0:
        return None
    n, dim = x.shape[1], x.shape[2]
    a_idx, b_idx, sizes, tokens = split.a_idx.view(-1), split.b_idx.view(-1), size.view(-1), x.view(n, dim)
    src_pos = a_idx[slot]
    dst_pos = b_idx[matches.scores.view(len(a_idx), -1)[slot].argmax(dim=-1)]
    src_size = sizes[src_pos]
    new_size = sizes.index_add(0, dst_pos, src_size)
    # Output order: sort positions by group (protected 0, sources 1, destinations 2, merged 3).
    group = torch.full((n,), 2 * n, device=x.device, dtype=torch.long)
    group[:num_protected] = 0
    group = group.index_fill_(0, a_idx, n).index_fill_(0, src_pos, 3 * n)
    order = group.add_(torch.arange(n, device=x.device)).argsort()[: n - len(slot)]
    moved = tokens.index_select(0, src_pos) * src_size.to(x.dtype)[:, None]
    total = (tokens * sizes.to(x.dtype)[:, None]).index_add_(0, dst_pos, moved)
    mean = total / new_size.to(x.dtype)[:, None]
    if keep_norm:  # each merged token at its parts' size-weighted mean length, as merge_tokens does
        lengths = (tokens.norm(dim=-1, keepdim=True) * sizes.to(x.dtype)[:, None]).index_add_(
            0, dst_pos, tokens.index_select(0, src_pos).norm(dim=-1, keepdim=True) * src_size.to(x.dtype)[:, None]
        )
        mean = mean * (lengths / new_size.to(x.dtype)[:, None] / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    merged = torch.where((new_size != sizes)[:, None], mean, tokens)
    count = torch.full((1,), len(order), device=x.device, dtype=torch.long)
    return Merged(merged.index_select(0, order).view(1, -1, dim), new_size[order].view(1, -1), None, count)
