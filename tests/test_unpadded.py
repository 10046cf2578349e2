"""Splits, weights, selections and merges for unpadded batches equal the general ones bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atm_lightning.flops import ViTCost
from atm_lightning.merge import (
    MatchContext,
    ToMe,
    alternating_split,
    best_matches,
    class_attention,
    effective_matches,
    merge_tokens,
    pair_weight,
    per_head_keys,
    size_sorted_split,
    top_r,
)
from atm_lightning.merge.unpadded import (
    full_alternating_split,
    full_size_sorted_split,
    merge_single_image,
    num_sources,
)
from atm_lightning.patch.loop import matching_cost


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
    for width in (n, n + 1):  # odd and even token counts
        alternating = full_alternating_split(1, width, protected, torch.device("cpu"))
        assert num_sources("alternate", width, protected) == alternating.a_idx.shape[1]
        sized = full_size_sorted_split(torch.ones(1, width), protected)
        assert num_sources("size", width, protected) == sized.a_idx.shape[1]
    counts = torch.arange(protected, n + 1)  # a ragged batch's counts: each as that image alone
    for kind in ("alternate", "size"):
        expected = [num_sources(kind, int(c), protected) for c in counts]
        assert num_sources(kind, counts, protected).tolist() == expected
    real = torch.arange(n)[None] < counts[:, None]  # the general split of the padded batch agrees
    assert num_sources("alternate", counts, protected).tolist() == alternating_split(real, protected).a_ok.sum(1).tolist()


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


def _unpadded_splits(size, protected):
    """(fast, general) pairs of splits naming the same slots of an unpadded batch."""
    valid = size > 0
    return [
        (full_alternating_split(len(size), size.shape[1], protected, size.device), alternating_split(valid, protected)),
        (full_size_sorted_split(size, protected), size_sorted_split(size, protected)),
    ]


@pytest.mark.parametrize("protected", [1, 2])
def test_pair_weights_without_padding_equal_the_general_ones(protected):
    """Slots read directly (views for the alternating split) give the general weights bit for bit."""
    torch.manual_seed(protected)
    batch, n = 3, 15
    size = torch.randint(1, 6, (batch, n)).float()
    attention = torch.rand(batch, n).softmax(-1)
    keys = torch.randn(batch, n, 8)
    unprotected = torch.full((batch,), n - protected)
    for fast, general in _unpadded_splits(size, protected):
        for size_weighted, power in ((True, 0.0), (False, 0.5), (True, 0.5)):
            got = pair_weight(fast, size, size_weighted, attention, power, unprotected)
            want = pair_weight(general, size, size_weighted, attention, power, unprotected)
            assert torch.equal(got, want)
            got_matches = effective_matches(best_matches(keys, fast), fast, got)
            want_matches = effective_matches(best_matches(keys, general), general, want)
            assert torch.equal(got_matches.scores, want_matches.scores)
            assert torch.equal(got_matches.similarity, want_matches.similarity)


def test_matching_cost_without_padding_equals_the_general_count():
    cost = ViTCost(
        depth=1, qkv_per_token=0, attn_width=192, proj_per_token=0, mlp_per_token=0, head_dim=64,
        patch_embed=0, num_prefix=1, head=0,
    )
    size = torch.ones(2, 11)
    count = torch.full((2,), 11)
    for fast, general in _unpadded_splits(size, 1):
        for with_class in (False, True):
            want = matching_cost(cost, general, 64, count, 1, with_class)
            assert torch.equal(matching_cost(cost, fast, 64, count, 1, with_class), want)


def test_top_r_with_one_count_for_all_equals_per_image_counts():
    """Ties, -inf and NaN are chosen as with per-image counts."""
    similarity = torch.tensor([[0.5, 0.9, 0.5, -math.inf, 0.1, 0.5], [0.2, float("nan"), 0.3, 0.3, 0.9, 0.0]])
    for r in range(7):
        assert torch.equal(top_r(similarity, r), top_r(similarity, torch.full((2,), r)))


def test_tome_cap_without_padding_equals_the_per_image_cap():
    torch.manual_seed(0)
    size = torch.ones(2, 12)
    keys = torch.randn(2, 12, 4)
    for r in (3, 9):
        tome = ToMe(r=r)
        for fast, general in _unpadded_splits(size, 1):
            selected = []
            for split in (fast, general):
                context = MatchContext(0, split, best_matches(keys, split), size, torch.full((2,), 11))
                selected.append(tome.select(context))
            assert torch.equal(selected[0], selected[1])


def test_per_head_keys_and_class_attention_equal_their_plain_formulas():
    """The one-op forms give what F.normalize and ``@`` give, on timm's strided views."""
    torch.manual_seed(0)
    for batch in (1, 3):
        q, k, _ = torch.randn(batch, 13, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d] views
        plain = (F.normalize(k, dim=-1) / 2).permute(0, 2, 1, 3).reshape(batch, 13, -1)
        assert torch.equal(per_head_keys(k), plain)
        bias = torch.rand(batch, 1, 1, 13).log()
        logits = (q[:, :, :1] * 0.3) @ k.transpose(-1, -2) + bias
        assert torch.equal(class_attention(q[:, :, :1], k, 0.3, bias), logits.softmax(-1).mean(1)[:, 0])
