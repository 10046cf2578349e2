"""Ragged-batch layout: packed rows, attention groups and their padding (no timm)."""

from __future__ import annotations

import itertools

import pytest
import torch

from atm_lightning.patch import ragged
from atm_lightning.patch.ragged import attention_groups, ragged_layout


def _cost(lengths: list[int], ranges: list[tuple[int, int]], channels: int) -> float:
    return sum((b - a) * lengths[a] ** 2 * 2 * channels + ragged.GROUP_OVERHEAD_MACS for a, b in ranges)


def test_attention_groups_are_the_cheapest_split():
    """The dynamic programme finds the optimum a brute force over every split finds."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        # Few distinct values, so runs of equal lengths (where no range may start) are common.
        lengths = sorted(torch.randint(10, 198, (4,), generator=g).tolist() * 2, reverse=True)[:7]
        ranges = attention_groups(lengths, channels=192)
        assert ranges[0][0] == 0 and ranges[-1][1] == 7
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        best = min(
            _cost(lengths, list(itertools.pairwise((0, *cuts, 7))), 192)
            for k in range(7)
            for cuts in itertools.combinations(range(1, 7), k)
        )
        assert _cost(lengths, ranges, 192) == pytest.approx(best)


def test_group_overhead_trades_padding_for_calls(monkeypatch):
    lengths = [197, 190, 120, 118, 60]
    monkeypatch.setattr(ragged, "GROUP_OVERHEAD_MACS", 0.0)
    assert attention_groups(lengths, 192) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    monkeypatch.setattr(ragged, "GROUP_OVERHEAD_MACS", 1e12)
    assert attention_groups(lengths, 192) == [(0, 5)]


def test_layout_rows_gather_and_slots_reassemble_the_padded_batch(monkeypatch):
    monkeypatch.setattr(ragged, "GROUP_OVERHEAD_MACS", 100.0)  # several groups at this toy size
    count = torch.tensor([9, 9, 7, 4, 4, 2])
    width, channels = 9, 3
    padded = torch.randn(len(count), width, channels)
    real = torch.arange(width) < count[:, None]
    padded[~real] = 0
    packed = padded[real]  # each image's real tokens, one image after another
    layout = ragged_layout(count, width, channels=4)

    assert torch.equal(layout.real_rows, real.view(-1).nonzero().squeeze(1))
    assert torch.equal(padded.view(-1, channels)[layout.real_rows], packed)
    assert len(layout.groups) > 1
    assert layout.groups[0].start == 0 and layout.groups[-1].stop == len(count)
    assert all(a.stop == b.start for a, b in itertools.pairwise(layout.groups))
    for group in layout.groups:
        rows = group.stop - group.start
        assert group.length == int(count[group.start])
        block = packed[group.gather].view(rows, group.length, channels)
        inside = real[group.start : group.stop, : group.length]
        # Real slots hold the image's own tokens; padding slots repeat one of its real tokens.
        assert torch.equal(block[inside], padded[group.start : group.stop, : group.length][inside])
        for i in range(rows):
            assert any(torch.equal(row, block[i, 0]) for row in block[i][~inside[i]]) or inside[i].all()
        # ``slots`` picks the real tokens back out, in packed order.
        assert torch.equal(block.view(-1, channels)[group.slots], packed[group.packed])


def test_layout_needs_sorted_counts_and_padding():
    assert ragged_layout(torch.tensor([5, 5, 5]), width=5, channels=8) is None
    with pytest.raises(ValueError, match="sorted by descending token count"):
        ragged_layout(torch.tensor([3, 5, 4]), width=5, channels=8)
