"""Splits and merges for unpadded batches equal the general ones bit for bit (no timm)."""

from __future__ import annotations

import pytest
import torch

from atm_lightning.merge import alternating_split, best_matches, merge_tokens, size_sorted_split
from atm_lightning.merge.unpadded import full_alternating_split, full_size_sorted_split, merge_single_image


def _same_split(fast, general) -> None:
    for name in ("a_idx", "a_ok", "b_idx", "b_ok"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    assert fast.all_real and not general.all_real


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
def test_full_splits_equal_general_splits_without_padding(protected):
    torch.manual_seed(protected)
    batch, n = 3, 15
    _same_split(
        full_alternating_split(batch, n, protected, torch.device("cpu")),
        alternating_split(torch.ones(batch, n, dtype=torch.bool), protected),
    )
    size = torch.randint(1, 6, (batch, n)).float()
    _same_split(full_size_sorted_split(size, protected), size_sorted_split(size, protected))


def test_full_split_made_in_inference_mode_serves_gradients():
    with torch.inference_mode():
        split = full_alternating_split(1, 11, 1, torch.device("cpu"))
    x = torch.randn(1, 11, 4, requires_grad=True)
    x[0, split.a_idx[0]].sum().backward()  # an inference tensor as index would refuse to be saved
    assert x.grad.sum() == len(split.a_idx[0]) * 4


@pytest.mark.parametrize("keep_norm", [False, True])
@pytest.mark.parametrize("kind", ["alternate", "size"])
@pytest.mark.parametrize("protected", [1, 2])
def test_merge_single_image_equals_merge_tokens(kind, protected, keep_norm):
    """Same tokens, sizes and count, bit for bit, with several sources per destination."""
    for seed in range(6):
        torch.manual_seed(seed)
        n, dim = 17, 8
        size = torch.randint(1, 5, (1, n)).float()
        x = torch.randn(1, n, dim)
        keys = torch.randn(1, n, 4)
        keys[:, 1::3] = keys[:, 2]  # many sources choose the same destination
        if kind == "size":
            fast, general = full_size_sorted_split(size, protected), size_sorted_split(size, protected)
        else:
            fast = full_alternating_split(1, n, protected, x.device)
            general = alternating_split(size > 0, protected)
        fast_matches, matches = best_matches(keys, fast), best_matches(keys, general)
        assert torch.equal(fast_matches.scores, matches.scores)
        selected = torch.rand(fast.a_idx.shape) < 0.5
        out = merge_single_image(x, size, fast, fast_matches, selected, protected, keep_norm)
        for pack in (False, True):
            expected = merge_tokens(
                x, size, None, general, matches, selected, protected, sort_images=pack, pack=pack, keep_norm=keep_norm
            )
            assert torch.equal(out.x.view(-1, dim), expected.x.view(-1, dim))
            assert torch.equal(out.size, expected.size) and torch.equal(out.count, expected.count)


def test_merge_single_image_returns_none_when_nothing_merges():
    split = full_alternating_split(1, 9, 1, torch.device("cpu"))
    matches = best_matches(torch.randn(1, 9, 4), split)
    selected = torch.zeros(split.a_idx.shape, dtype=torch.bool)
    assert merge_single_image(torch.randn(1, 9, 3), torch.ones(1, 9), split, matches, selected, 1) is None
