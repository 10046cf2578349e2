"""Layout of a ragged batch for packed execution: which rows are real, and attention groups.

After merging, image ``i`` of a batch holds ``count[i]`` real tokens followed by padding, and the
patched model keeps images sorted by descending count. Token-wise layers (norms, linear layers,
the MLP) then run on the real tokens packed into one ``[T, C]`` matrix; attention, which must
see each image alone, runs on a few groups of neighbouring images, each padded only to its own
longest image. Everything here is index bookkeeping, computed once per merge step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

# Fixed cost of one attention call (about 15 small ops) in multiply-adds of attention scores;
# measured on 2 CPU cores, where it is worth roughly one 130-token image at width 192.
GROUP_OVERHEAD_MACS = 6e6


@dataclass(frozen=True)
class AttentionGroup:
    """Images ``start:stop`` (sorted rows) attended together, padded to ``length`` tokens."""

    start: int
    stop: int
    length: int
    packed: slice  # their real tokens in the packed matrix (contiguous: rows are sorted)
    slots: Tensor  # [T_g] long: position of each of those tokens in the flat [G * length] padded block
    gather: Tensor  # [G * length] long: packed row for each padded slot (padding: its image's first token)


@dataclass(frozen=True)
class RaggedLayout:
    """Where the real tokens of a ``[B, W, C]`` batch are, and how attention is grouped.

    The groups are worked out on first use: a forward whose attention runs in the compiled kernel
    (:func:`atm_lightning.merge.fused.fused_packed_attention`) never asks for them.
    """

    real_rows: Tensor  # [T] long: flat rows ``b * W + j`` of the real tokens, in order
    lengths: tuple[int, ...]  # real tokens of each image, descending
    channels: int  # attention width: how dear a padded score is against one more call

    @cached_property
    def groups(self) -> list[AttentionGroup]:
        return attention_layout(list(self.lengths), self.channels, self.real_rows.device)


def ragged_layout(count: Tensor, width: int, channels: int) -> RaggedLayout | None:
    """Layout for images with ``count`` [B] real tokens (sorted descending), or None when none is padded.

    ``channels`` (the attention width) sets how dear a padded attention score is against the
    fixed cost of one more attention call. The indices are built on the host (the counts are
    needed there anyway) and moved to ``count``'s device in one copy.
    """
    lengths = count.tolist()
    if all(n == width for n in lengths):
        return None
    if any(a < b for a, b in itertools.pairwise(lengths)):
        raise ValueError(f"ragged execution needs images sorted by descending token count, got {lengths}")
    real = np.arange(width) < np.asarray(lengths)[:, None]  # [B, W]
    real_rows = torch.from_numpy(np.flatnonzero(real)).to(count.device)
    return RaggedLayout(real_rows, tuple(lengths), channels)


def attention_layout(lengths: list[int], channels: int, device: torch.device) -> list[AttentionGroup]:
    """The attention groups of images with descending ``lengths`` real tokens, with their indices
    into the packed rows, moved to ``device`` in one copy."""
    counts = np.asarray(lengths)
    first = np.cumsum(counts) - counts  # packed row of each image's first token
    ranges = attention_groups(lengths, channels)
    pieces = []
    for start, stop in ranges:
        positions = np.arange(lengths[start])  # the group is padded to its longest image
        block = positions < counts[start:stop, None]  # [G, L]: the group's real slots
        pieces.append(np.flatnonzero(block))
        # Packed row of slot j of image i: its own token j, or its first token where it has none.
        pieces.append((first[start:stop, None] + np.where(block, positions, 0)).ravel())
    indices = torch.from_numpy(np.concatenate(pieces)).to(device).split([len(p) for p in pieces])
    groups = []
    for (start, stop), slots, gather in zip(ranges, indices[0::2], indices[1::2], strict=True):
        packed = slice(int(first[start]), int(first[start]) + len(slots))
        groups.append(AttentionGroup(start, stop, lengths[start], packed, slots, gather))
    return groups


def attention_groups(lengths: list[int], channels: int) -> list[tuple[int, int]]:
    """Split rows with descending ``lengths`` into ranges minimising padded attention work.

    Dynamic programming over the sorted lengths: a range costs its padded score matrices
    (``rows * length**2 * 2 * channels`` multiply-adds) plus :data:`GROUP_OVERHEAD_MACS`. Ranges
    only start where the length changes: moving a start back to the beginning of its run of
    equal lengths never costs more (the rows it adds pay the same padding as before).
    """
    num = len(lengths)
    starts = [i for i in range(num) if i == 0 or lengths[i] != lengths[i - 1]]
    bounds = np.asarray([*starts, num])  # candidate range boundaries, as row indices
    area = np.asarray([lengths[i] for i in starts], dtype=np.float64) ** 2 * 2 * channels
    best = np.zeros(len(bounds))  # best[j]: cheapest split of rows [0, bounds[j])
    cut = [0] * len(bounds)  # cut[j]: boundary index where the last range of that split starts
    for j in range(1, len(bounds)):
        # A last range [bounds[i], bounds[j]) costs its rows padded to lengths[bounds[i]] (sorted).
        costs = best[:j] + (bounds[j] - bounds[:j]) * area[:j] + GROUP_OVERHEAD_MACS
        cut[j] = int(costs.argmin())
        best[j] = costs[cut[j]]
    ranges = []
    j = len(bounds) - 1
    while j > 0:
        ranges.append((int(bounds[cut[j]]), int(bounds[j])))
        j = cut[j]
    return ranges[::-1]
