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
    """Where the real tokens of a ``[B, W, C]`` batch are, and how attention is grouped."""

    real_rows: Tensor  # [T] long: flat rows ``b * W + j`` of the real tokens, in order
    groups: list[AttentionGroup]


def ragged_layout(count: Tensor, width: int, channels: int) -> RaggedLayout | None:
    """Layout for images with ``count`` [B] real tokens (sorted descending), or None when none is padded.

    ``channels`` (the attention width) sets how dear a padded attention score is against the
    fixed cost of one more attention call.
    """
    lengths = count.tolist()
    if all(n == width for n in lengths):
        return None
    if any(a < b for a, b in itertools.pairwise(lengths)):
        raise ValueError(f"ragged execution needs images sorted by descending token count, got {lengths}")
    device = count.device
    real = torch.arange(width, device=device)[None, :] < count[:, None]
    real_rows = real.view(-1).nonzero().squeeze(1)
    groups = []
    offset = 0
    for start, stop in attention_groups(lengths, channels):
        length = lengths[start]
        block = real[start:stop, :length]
        rows = block.reshape(-1).nonzero().squeeze(1)
        # Packed row of slot j of image i: its own token j, or its first token where it has none.
        first = offset + torch.cat([count.new_zeros(1), count[start : stop - 1].cumsum(0)])
        slot = torch.arange(length, device=device)
        gather = (first[:, None] + torch.where(block, slot, 0)).reshape(-1)
        groups.append(AttentionGroup(start, stop, length, slice(offset, offset + len(rows)), rows, gather))
        offset += len(rows)
    return RaggedLayout(real_rows, groups)


def attention_groups(lengths: list[int], channels: int) -> list[tuple[int, int]]:
    """Split rows with descending ``lengths`` into ranges minimising padded attention work.

    Dynamic programming over the sorted lengths: a range costs its padded score matrices
    (``rows * length**2 * 2 * channels`` multiply-adds) plus :data:`GROUP_OVERHEAD_MACS`.
    """
    num = len(lengths)
    area = np.asarray(lengths, dtype=np.float64) ** 2 * 2 * channels  # padded scores per row of a range
    best = np.zeros(num + 1)  # best[j]: cheapest split of rows [0, j)
    cut = [0] * (num + 1)  # cut[j]: where the last range of that split starts
    for j in range(1, num + 1):
        # A last range [i, j) costs (j - i) rows padded to lengths[i] (the longest: sorted).
        costs = best[:j] + (j - np.arange(j)) * area[:j] + GROUP_OVERHEAD_MACS
        cut[j] = int(costs.argmin())
        best[j] = costs[cut[j]]
    ranges = []
    j = num
    while j > 0:
        ranges.append((cut[j], j))
        j = cut[j]
    return ranges[::-1]
