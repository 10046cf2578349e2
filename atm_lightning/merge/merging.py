"""Carry out a merge decision for a whole batch: where every token goes, and one product that moves them.

A decision says, for each slot of each image, its *target*: the slot it merges into (its match,
for a source that merges) or itself. From the targets follow the new sizes (sizes add up), which
slots remain, and their order: ``[protected, unmerged sources, destinations]``, each group in
position order (ToMe's layout), for every image that merged anything; an image that merged
nothing keeps its order, exactly as if the step had been skipped for it alone.

The tokens then move in one batched product with a ``[B, W', W]`` matrix holding each input's
size in the row of its output slot: every output is the size-weighted sum of what it took in,
divided by its new size, so a token always equals the mean of the patches it stands for. The
number of operations does not depend on how many tokens merge or on the batch size; the one
number the host needs, the new padded width, is read when images merge different counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

_PROTECTED, _SOURCE, _DESTINATION = 0, 1, 2  # group order after a merge


@dataclass(frozen=True)
class Plan:
    """Where each input slot goes, and what the merged batch holds, before it is narrowed."""

    out_row: Tensor  # [B, W] long: output slot of every input slot (padding: past its image's tokens)
    free: Tensor | int  # [B] tokens per image that may merge after it, or one int when every image holds as many
    width: int | None  # W': the widest image after it, None until read from the device (:meth:`widest`)

    def widest(self) -> Tensor:
        """The widest image's tokens that may merge, on the device: read it to learn the width."""
        return self.free.amax()


def plan(
    size: Tensor,
    target: Tensor,
    group_key: Tensor,
    free: Tensor | int,
    protected: int,
    merges: int | None,
) -> Plan:
    """The plan of a merge step, made on the device.

    ``size`` [B, W] (0 on padding), ``target`` [B, W] (each slot's own position, or its match's
    for a source that merges), ``group_key`` [W] or [B, W] each slot's sort key in the merged
    order (:func:`alternating_group_keys`, :func:`size_group_keys`), ``free`` the tokens per image
    that may merge ([B], or an int when no image is padded), the first ``protected`` never do.
    ``merges``: how many sources every image merges when the host knows it (one count for the
    whole batch); otherwise the new width is on the device (:meth:`Plan.widest`).
    """
    batch, width = size.shape
    new_size = torch.zeros_like(size).scatter_add_(1, target, size)
    kept = new_size > 0  # padding had size 0; merged sources gave theirs away
    if merges is not None:  # every image: the same count, no padding
        new_free, new_width = free - merges, width - merges
        key = group_key if merges > 0 else positions(width, size.device)
    else:
        new_free, new_width = kept[:, protected:].sum(1), None
        key = torch.where((new_free < free)[:, None], group_key, positions(width, size.device))
    order = torch.where(kept, key, _BIG).argsort(dim=1)
    return Plan(order.argsort(dim=1).gather(1, target), new_free, new_width)


_BIG = 1 << 40  # past every group key: dropped slots sort last


@cache
def positions(width: int, device: torch.device) -> Tensor:
    """[W] 0..W-1 (made once per width)."""
    with torch.inference_mode(False):
        return torch.arange(width, device=device)


@cache
def alternating_group_keys(width: int, protected: int, device: torch.device) -> Tensor:
    """[W] sort keys of the merged order for the alternating split: ``group * W + position``."""
    with torch.inference_mode(False):
        position = torch.arange(width, device=device)
        group = torch.where(position % 2 == 0, _SOURCE, _DESTINATION)  # the split's rows are the even positions
        return torch.where(position < protected, _PROTECTED, group) * width + position


def size_group_keys(body: Tensor, is_source: Tensor, width: int) -> Tensor:
    """[B, W] sort keys of the merged order for the size split: ``body`` [B, W - protected] the
    unprotected positions sorted by size, ``is_source`` [B or 1, W - protected] which are sources."""
    group = torch.where(is_source, _SOURCE * width, _DESTINATION * width)
    slots = positions(width, body.device).expand(body.shape[0], -1)
    return slots.scatter(1, body, body + group)


def move_matrix(plan: Plan, weight: Tensor, width: int) -> Tensor:
    """[B, W', W]: row ``j`` of image ``b`` holds the ``weight`` [B, W] of every input that goes to
    output slot ``j`` (padding weighs 0, and its slots lie past its image's tokens); ``width`` is
    W'. Built by comparison, not by scattering into a wider matrix, so that the shape holds no view."""
    rows = positions(width, weight.device)[None, :, None]
    return (plan.out_row[:, None, :] == rows) * weight[:, None, :]


def combine(x: Tensor, matrix: Tensor) -> Tensor:
    """``[B, W', C]``: ``matrix`` (:func:`move_matrix`) applied to ``x`` [B, W, C] in one batched
    product, outside autocast so that the tokens keep their precision."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.bmm(matrix, x)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without an operation when it is of that type already."""
    return t if t.dtype == dtype else t.to(dtype)


def mean_tokens(x: Tensor, matrix: Tensor, new_size: Tensor, keep_norm: bool = False) -> Tensor:
    """The merged tokens: each the size-weighted mean of what it took in (``x`` [B, W, C],
    ``matrix`` :func:`move_matrix` of the input sizes in ``x``'s type, ``new_size`` [B, W'] its row
    sums). ``keep_norm`` rescales each to the size-weighted mean length of its parts: averaging
    tokens that point different ways shortens the result, which the mean alone does not undo."""
    new_size = as_dtype(new_size, x.dtype)[..., None]
    with torch.autocast(x.device.type, enabled=False):
        total = torch.bmm(matrix, x)
        if not keep_norm:
            return total / new_size.clamp_min(1)  # padding: 0 / 1
        length = torch.bmm(matrix, x.norm(dim=-1, keepdim=True))  # sum of size * |x|
        # total * (length / n) / (|total| / n) / n: the mean, at the mean length.
        return total * (length / torch.addcmul(_tiny(x), total.norm(dim=-1, keepdim=True), new_size))


def _tiny(like: Tensor) -> Tensor:
    return _tiny_scalar(like.device, like.dtype)


@cache
def _tiny_scalar(device: torch.device, dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False):
        return torch.tensor(torch.finfo(dtype).tiny, device=device, dtype=dtype)


def merge_error(x_i: Tensor, x_j: Tensor, n_i: float, n_j: float) -> tuple[Tensor, Tensor]:
    """Both sides of the paper's Theorem 1 for merging two tokens of sizes ``n_i`` and ``n_j``.

    Returns ``(n_i*||X-X_i||^2 + n_j*||X-X_j||^2, n_i*n_j/(n_i+n_j) * ||X_i-X_j||^2)`` with
    ``X`` the size-weighted mean; they are equal, which is why merging two large tokens is costly.
    """
    merged = (n_i * x_i + n_j * x_j) / (n_i + n_j)
    lhs = n_i * (merged - x_i).pow(2).sum(-1) + n_j * (merged - x_j).pow(2).sum(-1)
    rhs = n_i * n_j / (n_i + n_j) * (x_i - x_j).pow(2).sum(-1)
    return lhs, rhs
