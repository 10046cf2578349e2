"""Carry out a merge decision: size-weighted means, size sums, source tracking, compaction.

After a merge each image keeps ``[protected tokens, unmerged sources, destinations]`` in that
order (each group in position order), which is ToMe's layout; images that merged fewer pairs are
padded at the end with size-0 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .matching import Matches, Split

# Group codes used to order tokens after a merge; dropped tokens sort last.
_PROTECTED, _UNMERGED_SOURCE, _DESTINATION, _DROPPED = 0, 1, 2, 3


@dataclass(frozen=True)
class Merged:
    """Tokens after one merge step."""

    x: Tensor  # [B, N', C], or [T, C] packed (merge_tokens(pack=True))
    size: Tensor  # [B, N'] float, 0 marks padding
    source: Tensor | None  # [B, N', T0] float, which original patches each token holds
    count: Tensor  # [B] long, real tokens per image
    image_order: Tensor | None = None  # [B] long: output image i is input image image_order[i]


def _output_order(
    size: Tensor, split: Split, selected: Tensor, num_protected: int
) -> tuple[Tensor, Tensor]:
    """Per image, the input positions of its output tokens in order, and its real-token count.

    Returns ``order`` [B, keep] (positions in [0, N]; entries past an image's count are not real)
    and ``count`` [B]. The order is ``[protected, unmerged sources, destinations]``; an image that
    merges nothing keeps its own order, exactly as if the step had been skipped for it alone: this
    is what makes results independent of batch-mates.
    """
    batch, n = size.shape
    group = torch.full((batch, n + 1), _DROPPED, device=size.device, dtype=torch.long)
    group[:, :num_protected] = _PROTECTED
    group[:, :n][size == 0] = _DROPPED
    merged_any = selected.any(dim=1, keepdim=True)
    a_group = torch.where(split.a_ok & ~selected, _UNMERGED_SOURCE, _DROPPED)
    b_group = torch.where(split.b_ok, torch.where(merged_any, _DESTINATION, _UNMERGED_SOURCE), _DROPPED)
    group = group.scatter_reduce(1, split.a_idx, a_group, reduce="amin")
    group = group.scatter_reduce(1, split.b_idx, b_group, reduce="amin")
    group[:, n] = _DROPPED
    count = (group < _DROPPED).sum(dim=1)
    keep = int(count.max())
    positions = torch.arange(n + 1, device=size.device)
    order = (group * (n + 1) + positions).argsort(dim=1)[:, :keep]
    return order, count


class _Pairs(NamedTuple):
    """Every merged pair: its input image, source and destination positions, and source size."""

    image: Tensor  # [P]
    src_pos: Tensor  # [P]
    dst_pos: Tensor  # [P]
    src_size: Tensor  # [P]


class _Layout(NamedTuple):
    """Where each output token comes from: output row i holds input image ``in_image[i]``."""

    order: Tensor  # [B, keep] input positions of the output slots, in [0, N]
    position: Tensor  # [B, keep] the same, clamped to [0, N-1] (slots that are not real: anything)
    real: Tensor  # [B, keep] bool: slots that hold a token
    count: Tensor  # [B] real tokens per output row
    in_image: Tensor  # [B] input image of each output row
    out_image: Tensor  # [B] output row of each input image
    image_order: Tensor | None  # in_image when images were reordered, else None


def merge_tokens(
    x: Tensor,
    size: Tensor,
    source: Tensor | None,
    split: Split,
    matches: Matches,
    selected: Tensor,
    num_protected: int,
    sort_images: bool = False,
    pack: bool = False,
    keep_norm: bool = False,
) -> Merged:
    """Merge each selected source into its matched destination.

    The destination becomes the size-weighted mean of itself and everything merged into it and
    its size the sum, so a token always equals the mean of the patches it stands for.
    Destinations that received nothing are copied unchanged (no ``x*s/s`` rounding).

    The tokens are moved once (one row gather into the output); only the merged pairs are
    touched again, so the step costs little more than a copy however many tokens merge.

    ``x`` is padded [B, N, C], or packed [T, C]: each image's real tokens (``size > 0``, always a
    prefix of its row of ``size``) one image after the other. ``pack=True`` returns ``Merged.x``
    packed the same way. ``sort_images=True`` also reorders the images by descending token
    count, so that images of similar length sit next to each other (see ``Merged.image_order``).
    ``keep_norm=True`` rescales each merged token to the size-weighted mean length of its parts:
    averaging tokens that point different ways shortens the result, which the mean alone does not undo.
    """
    batch, n = size.shape
    selected = selected & split.a_ok
    image, slot = selected.nonzero().unbind(1)  # every merged pair: input image, source slot
    src_pos = split.a_idx[image, slot]
    pairs = _Pairs(image, src_pos, split.b_idx[image, matches.dst_of(image, slot)], size[image, src_pos])
    new_size = size.index_put((pairs.image, pairs.dst_pos), pairs.src_size, accumulate=True)
    layout = _output_layout(size, split, selected, num_protected, sort_images)
    out_size = (new_size[layout.in_image] if sort_images else new_size).gather(1, layout.position) * layout.real
    if x.dim() == 2:
        in_start = _row_starts((size > 0).sum(dim=1))
    else:
        in_start = torch.arange(batch, device=x.device) * n
    padded_start = torch.arange(batch, device=x.device) * layout.order.shape[1]
    out_start = _row_starts(layout.count) if pack else padded_start
    flat_x = x.reshape(-1, x.shape[-1])
    out_x = _gather_tokens(flat_x, in_start, layout, pack)
    out_source = None
    if source is not None:
        source = source.reshape(-1, source.shape[-1])
        rows = (layout.in_image[:, None] * n + layout.position).view(-1)
        out_source = _zero_padding(source.index_select(0, rows), layout.real).view(*layout.real.shape, -1)
    if len(pairs.image) > 0:
        out_slot = _slot_of_position(layout.order, out_start, n)
        _average_destinations(out_x, flat_x, in_start, size, new_size, pairs, layout, out_slot, keep_norm)
        if out_source is not None:  # source stays padded even when x is packed
            pad_slot = _slot_of_position(layout.order, padded_start, n) if pack else out_slot
            dst_pad = pad_slot[layout.out_image[pairs.image], pairs.dst_pos]
            moved = source.index_select(0, pairs.image * n + pairs.src_pos)
            out_source.view(-1, source.shape[-1]).index_add_(0, dst_pad, moved)
    return Merged(out_x, out_size, out_source, layout.count, layout.image_order)


def _output_layout(size: Tensor, split: Split, selected: Tensor, num_protected: int, sort_images: bool) -> _Layout:
    """Which input token fills each output slot, with the images optionally sorted by token count."""
    batch, n = size.shape
    order, count = _output_order(size, split, selected, num_protected)
    in_image = torch.arange(batch, device=size.device)
    image_order = None
    if sort_images:
        image_order = in_image = count.argsort(descending=True, stable=True)
        order, count = order[in_image], count[in_image]
    out_image = torch.empty_like(in_image).index_copy_(0, in_image, torch.arange(batch, device=size.device))
    real = torch.arange(order.shape[1], device=size.device)[None, :] < count[:, None]
    # Slots that are not real may hold the trash position N: point them at any real column (dropped).
    return _Layout(order, order.clamp(max=n - 1), real, count, in_image, out_image, image_order)


def _gather_tokens(flat_x: Tensor, in_start: Tensor, layout: _Layout, pack: bool) -> Tensor:
    """The output tokens, moved in one row gather: packed [T', C], or padded [B, keep, C] with
    zeros in the slots that are not real."""
    # Input row of every output slot; slots that are not real point anywhere valid and are dropped.
    rows = (in_start[layout.in_image, None] + layout.position).clamp(max=len(flat_x) - 1)
    if pack:
        return flat_x.index_select(0, rows[layout.real])
    batch, keep = rows.shape
    return _zero_padding(flat_x.index_select(0, rows.view(-1)), layout.real).view(batch, keep, -1)


def _average_destinations(
    out_x: Tensor,
    flat_x: Tensor,
    in_start: Tensor,
    size: Tensor,
    new_size: Tensor,
    pairs: _Pairs,
    layout: _Layout,
    out_slot: Tensor,
    keep_norm: bool,
) -> None:
    """Destinations that took in sources become the size-weighted mean of themselves and their
    sources (rescaled to their parts' mean length with ``keep_norm``), in place in ``out_x``;
    every other output token stays as it was copied."""
    dim = flat_x.shape[-1]
    dst_rows = out_slot[layout.out_image[pairs.image], pairs.dst_pos]
    rec_image, rec_pos = (new_size != size).nonzero().unbind(1)
    rec_rows = out_slot[layout.out_image[rec_image], rec_pos]
    flat = out_x.view(-1, dim)
    rank = torch.zeros(len(flat), device=flat.device, dtype=torch.long)
    rank[rec_rows] = torch.arange(len(rec_rows), device=flat.device)
    src_x = flat_x.index_select(0, in_start[pairs.image] + pairs.src_pos)
    src_weight = pairs.src_size[:, None].to(flat.dtype)
    rec_x, rec_weight = flat.index_select(0, rec_rows), size[rec_image, rec_pos, None].to(flat.dtype)
    rec_size = new_size[rec_image, rec_pos, None].to(flat.dtype)
    mean = (rec_x * rec_weight).index_add_(0, rank[dst_rows], src_x * src_weight) / rec_size
    if keep_norm:
        lengths = (rec_x.norm(dim=-1, keepdim=True) * rec_weight).index_add_(
            0, rank[dst_rows], src_x.norm(dim=-1, keepdim=True) * src_weight
        )
        mean = mean * (lengths / rec_size / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    flat.index_copy_(0, rec_rows, mean)


def _slot_of_position(order: Tensor, starts: Tensor, n: int) -> Tensor:
    """[B, N+1]: the flat output row of every input position (output row ``i`` begins at
    ``starts[i]``); positions that are not real are never looked up."""
    slots = starts[:, None] + torch.arange(order.shape[1], device=order.device)
    return torch.zeros(order.shape[0], n + 1, device=order.device, dtype=torch.long).scatter_(1, order, slots)


def _row_starts(count: Tensor) -> Tensor:
    """First packed row of each image when images hold ``count`` tokens one after the other."""
    return count.cumsum(0) - count


def _zero_padding(rows: Tensor, real: Tensor) -> Tensor:
    """``rows`` [B*keep, C] with the rows of padding slots (``~real`` [B, keep]) set to zero."""
    return rows.index_fill_(0, (~real).view(-1).nonzero().squeeze(1), 0)


def merge_error(x_i: Tensor, x_j: Tensor, n_i: float, n_j: float) -> tuple[Tensor, Tensor]:
    """Both sides of the paper's Theorem 1 for merging two tokens of sizes ``n_i`` and ``n_j``.

    Returns ``(n_i*||X-X_i||^2 + n_j*||X-X_j||^2, n_i*n_j/(n_i+n_j) * ||X_i-X_j||^2)`` with
    ``X`` the size-weighted mean; they are equal, which is why merging two large tokens is costly.
    """
    merged = (n_i * x_i + n_j * x_j) / (n_i + n_j)
    lhs = n_i * (merged - x_i).pow(2).sum(-1) + n_j * (merged - x_j).pow(2).sum(-1)
    rhs = n_i * n_j / (n_i + n_j) * (x_i - x_j).pow(2).sum(-1)
    return lhs, rhs
