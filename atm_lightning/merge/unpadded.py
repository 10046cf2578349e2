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
    a_slice = slice(num_protected + num_protected % 2, n, 2)  # num_sources("alternate", ...) of them
    b_slice = slice(num_protected + (num_protected + 1) % 2, n, 2)
    a_pos = torch.arange(n, device=device)[a_slice].expand(batch, -1)
    b_pos = torch.arange(n, device=device)[b_slice].expand(batch, -1)
    a_ok = torch.ones(a_pos.shape, device=device, dtype=torch.bool)
    b_ok = torch.ones(b_pos.shape, device=device, dtype=torch.bool)
    return Split(a_pos, a_ok, b_pos, b_ok, a_slice, b_slice, all_real=True)


def num_sources(kind: str, n: int | Tensor, num_protected: int) -> int | Tensor:
    """How many of ``n`` tokens the ``kind`` split (``"size"`` or ``"alternate"``) makes sources
    when every token is real: the sizes of the splits below, without building them. ``n`` may be
    a [B] tensor of token counts (one answer per image)."""
    if kind == "size":
        return (n - num_protected + 1) // 2
    count = (n - (num_protected + num_protected % 2) + 1) // 2  # even positions past the protected
    return count.clamp_min(0) if isinstance(count, Tensor) else max(count, 0)


def full_size_sorted_split(size: Tensor, num_protected: int) -> Split:
    """:func:`.matching.size_sorted_split` of images whose tokens are all real (``size > 0``)."""
    batch, n = size.shape
    order = torch.sort(size[:, num_protected:], dim=1, stable=True).indices + num_protected
    num_a = num_sources("size", n, num_protected)
    a_idx, b_idx = order[:, :num_a], order[:, num_a:]
    a_ok, b_ok = _all_real(a_idx.shape, size.device), _all_real(b_idx.shape, size.device)
    return Split(a_idx, a_ok, b_idx, b_ok, all_real=True)


_ALL_REAL: dict[tuple[torch.Size, torch.device], Tensor] = {}


def _all_real(shape: torch.Size, device: torch.device) -> Tensor:
    """An all-true mask of ``shape`` (made once per shape; nothing writes to split masks)."""
    key = (shape, device)
    if key not in _ALL_REAL:
        with torch.inference_mode(False):
            _ALL_REAL[key] = torch.ones(shape, device=device, dtype=torch.bool)
    return _ALL_REAL[key]


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
    Every step is one op on the image's [N, C] rows or [N] sizes (gathers by ``index_select``),
    since at batch 1 the number of ops, not their arithmetic, sets the time.
    """
    slot = selected.view(-1).nonzero().view(-1)  # merged sources, in slot order (as merge_tokens pairs them)
    if len(slot) == 0:
        return None
    n, dim = x.shape[1], x.shape[2]
    tokens, num_a = x.view(n, dim), split.a_idx.shape[1]
    src_pos = split.a_idx.view(-1).index_select(0, slot)
    best = matches.scores.view(num_a, -1).index_select(0, slot).argmax(dim=-1)
    dst_pos = split.b_idx.view(-1).index_select(0, best)
    sizes = size.view(n)
    new_size = sizes.index_add(0, dst_pos, sizes.index_select(0, src_pos))
    weight, new_weight = _as_dtype(sizes, x.dtype).view(n, 1), _as_dtype(new_size, x.dtype).view(n, 1)
    weighted = tokens * weight  # a source's row here is its token times its size, as merge_tokens moves it
    mean = weighted.index_add_(0, dst_pos, weighted.index_select(0, src_pos)) / new_weight
    if keep_norm:  # each merged token at its parts' size-weighted mean length, as merge_tokens does
        lengths = tokens.norm(dim=-1, keepdim=True) * weight
        lengths = lengths.index_add_(0, dst_pos, lengths.index_select(0, src_pos))
        mean = mean * (lengths / new_weight / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    merged = torch.where((new_size != sizes).view(n, 1), mean, tokens)
    order = _output_order(split, src_pos, n, num_protected)
    count = torch.full((1,), len(order), device=x.device, dtype=torch.long)
    return Merged(merged.index_select(0, order).view(1, -1, dim), new_size.index_select(0, order).view(1, -1), None, count)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without an op when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _output_order(split: Split, src_pos: Tensor, n: int, num_protected: int) -> Tensor:
    """Input positions of the output tokens, ``[protected, unmerged sources, destinations]``.

    Positions are sorted by ``group * n + position`` (protected 0, sources 1, destinations 2);
    merged sources get ``3 * n``, past every kept key, and are cut off.
    """
    key = _group_keys(split, n, num_protected).index_fill(0, src_pos, 3 * n)
    return key.argsort()[: n - len(src_pos)]


_GROUP_KEYS: dict[tuple[int, int, torch.device], Tensor] = {}


def _group_keys(split: Split, n: int, num_protected: int) -> Tensor:
    """[N] long: ``group * n + position`` of every token before anything merges (made once per
    shape for the alternating split, whose groups depend on the shape alone)."""
    if split.a_slice is None:
        return _make_group_keys(split.a_idx.view(-1), n, num_protected)
    key = (n, num_protected, split.a_idx.device)
    if key not in _GROUP_KEYS:
        with torch.inference_mode(False):
            _GROUP_KEYS[key] = _make_group_keys(split.a_idx.view(-1), n, num_protected)
    return _GROUP_KEYS[key]


def _make_group_keys(a_idx: Tensor, n: int, num_protected: int) -> Tensor:
    group = torch.full((n,), 2 * n, device=a_idx.device, dtype=torch.long)
    group[:num_protected] = 0
    group.index_fill_(0, a_idx, n)
    return group.add_(torch.arange(n, device=a_idx.device))
