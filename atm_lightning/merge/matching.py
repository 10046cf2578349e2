"""Bipartite matching for a whole batch at once: sources, destinations and how alike they are.

Tokens are padded, ``[B, W, ...]``: image ``i`` holds its real tokens in its first ``count[i]``
slots, in the order the last merge left them. A block's matching pairs each *source* (a row) with
its most similar *destination* (a column) of the same image, as one batched product over every
image. Which tokens are rows and which columns is the split:

- alternating (ToMe's): sources at even positions past the protected tokens, destinations at odd
  ones. The positions are the same for every image, so rows and columns are strided views;
  padded slots are masked.
- by size (ATM's final blocks): per image, the real unprotected tokens stable-sorted by size;
  the smaller half ``ceil(m/2)`` are sources, the rest destinations. Values are gathered into
  that sorted order once; the rows are the first ``ceil(M/2)`` sorted slots (``M`` the widest
  image), the columns all sorted slots, masked to each image's own destinations.

Every function runs the same few tensor ops whatever the batch size, with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Split:
    """Where one block's sources (rows) and destinations (columns) are."""

    row_pos: Tensor  # [B, Na] or [1, Na] long: position of each source row
    col_pos: Tensor  # [B, Nb] or [1, Nb] long: position of each destination column
    row_ok: Tensor | None  # [B, Na] bool: rows that are real sources; None: all are
    col_mask: Tensor | None  # [B, 1, Nb]: 0 on real destinations, -inf elsewhere; None: all real
    protected: int
    order: Tensor | None = None  # size split: [B, W - protected] the body's slots (0 = first unprotected), sorted by size
    is_source: Tensor | None = None  # size split: [B or 1, W - protected] which sorted slots are sources
    row_slice: slice | None = None  # alternating split: rows and columns as strided views
    col_slice: slice | None = None

    def take(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """``values`` [B, W, ...] of every source row [B, Na, ...] and destination column [B, Nb, ...]."""
        if self.order is None:
            return values[:, self.row_slice], values[:, self.col_slice]
        body = values[:, self.protected :]
        index = self.order
        if body.dim() == 3:
            index = index[..., None].expand(-1, -1, body.shape[-1])
        ordered = body.gather(1, index)
        return ordered[:, : self.row_pos.shape[1]], ordered

    @property
    def num_rows(self) -> int:
        return self.row_pos.shape[1]


def alternating_split(width: int, protected: int, device: torch.device, col_mask: Tensor | None = None) -> Split:
    """ToMe's split of ``width`` slots; ``col_mask`` [B, 1, Nb] masks padded destination columns."""
    row_slice, col_slice, row_pos, col_pos = _alternating(width, protected, device)
    return Split(row_pos, col_pos, None, col_mask, protected, row_slice=row_slice, col_slice=col_slice)


@cache
def _alternating(width: int, protected: int, device: torch.device) -> tuple[slice, slice, Tensor, Tensor]:
    """Made once per shape: the alternating split depends on the width alone."""
    row_slice = slice(protected + protected % 2, width, 2)  # even positions past the protected
    col_slice = slice(protected + (protected + 1) % 2, width, 2)  # odd ones
    with torch.inference_mode(False):  # usable by forwards that record gradients, too
        positions = torch.arange(width, device=device)
        return row_slice, col_slice, positions[row_slice][None], positions[col_slice][None]


def size_split(size: Tensor, free: Tensor | int, protected: int, neg: Tensor | None) -> Split:
    """ATM's split by size: per image, its ``free`` unprotected tokens stable-sorted by size (ties
    in position order); the first ``ceil(free/2)`` are sources, the rest destinations.

    ``size`` [B, W]; ``free`` [B], or an int when every image holds all ``W`` slots; ``neg``
    [B, W] 0 on real slots and -inf on padding (None without padding).
    """
    batch, width = size.shape
    body = width - protected
    key = size[:, protected:] if neg is None else size[:, protected:] - neg[:, protected:]  # padding: +inf, last
    order = key.sort(dim=1, stable=True).indices
    position = order + protected
    num_rows = (body + 1) // 2
    if isinstance(free, int):  # every image: the same split sizes
        is_source, col_mask = _static_split(body, (free + 1) // 2, size.device, size.dtype)
        return Split(position[:, :num_rows], position, None, col_mask, protected, order, is_source)
    is_source = _arange(body, size.device) < (free + 1)[:, None] // 2
    sorted_neg = 0.0 if neg is None else neg[:, protected:].gather(1, order)
    col_mask = torch.where(is_source, NEG_INF, sorted_neg)[:, None]  # sources and padding: -inf
    return Split(position[:, :num_rows], position, is_source[:, :num_rows], col_mask, protected, order, is_source)


@cache
def _arange(n: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.arange(n, device=device)


@cache
def _static_split(body: int, num_a: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sources among the sorted slots, and the column mask, of images that all hold ``body`` tokens."""
    with torch.inference_mode(False):
        is_source = torch.arange(body, device=device)[None] < num_a
        return is_source, torch.zeros(1, 1, body, device=device, dtype=dtype).masked_fill_(is_source[:, None], NEG_INF)


def key_features(keys: Tensor, per_head: bool) -> tuple[Tensor, float]:
    """Rows of unit length to match on, [B, W, D], and the factor that turns their dot products into
    similarities. ``keys`` [B, H, W, d] per head: averaged over heads and normalised (ToMe, the
    paper), or each head normalised (``per_head``: the mean of the heads' cosine similarities)."""
    rows = keys.transpose(1, 2)  # [B, W, H, d]: a view of the attention's qkv
    if not per_head:
        rows = rows.sum(2, keepdim=True)  # the mean's direction
    normed = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return normed.flatten(2), 1.0 / normed.shape[2]


@dataclass(frozen=True)
class Matches:
    """Each source's best destination and how alike they are (minus ``offset``)."""

    score: Tensor  # [B, Na] similarity of the best match, plus ``offset``; -inf (or NaN) where no column is real
    dst: Tensor  # [B, Na] long: column of the best match (first on ties)
    offset: float  # score = similarity + offset: compare with ``threshold + offset``


def best_matches(
    rows: Tensor,
    cols: Tensor,
    scale: float,
    col_mask: Tensor | None,
    weight: Tensor | None = None,
) -> Matches:
    """Each source row's most similar destination column.

    ``rows`` [B, Na, D] and ``cols`` [B, Nb, D] unit features, ``scale`` turns their dot products
    into similarities, ``col_mask`` [B, 1, Nb] (0 / -inf) removes columns that are not this image's
    destinations. With ``weight`` [B, Na, Nb] (:mod:`.costs`), pairs compare by the effective
    similarity ``1 - (1 - cos) * weight``, kept minus one (``offset`` -1).
    """
    cols_t = cols.transpose(1, 2)
    if weight is None:
        base = col_mask if col_mask is not None else constant(0.0, rows)
        score, dst = torch.baddbmm(base, rows, cols_t, alpha=scale).max(dim=-1)
        return Matches(score, dst, 0.0)
    below_one = torch.baddbmm(constant(-1.0, rows), rows, cols_t, alpha=scale)  # cos - 1
    base = col_mask if col_mask is not None else constant(0.0, rows)
    score, dst = torch.addcmul(base, below_one, weight).max(dim=-1)
    return Matches(score, dst, -1.0)


def constant(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor of ``value`` on ``like``'s device and type, made once: an operand that
    broadcasts (``baddbmm``'s input, a dividend) without an operation per call."""
    return _scalar(value, like.device, like.dtype)


@cache
def _scalar(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False):
        return torch.tensor(value, device=device, dtype=dtype)
