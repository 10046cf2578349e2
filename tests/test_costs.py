"""Merge costs beyond plain cosine: size weighting, attention weighting, per-head keys, kept norms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atm_lightning import UnsupportedModelError, merge_stats, patch
from atm_lightning.merge import (
    ATM,
    alternating_split,
    best_matches,
    effective_matches,
    merge_tokens,
    pair_weight,
    per_head_keys,
    size_sorted_split,
)
from tests.helpers import ATM_LENIENT, blocky_images, make_vit


def _batch(seed: int = 0, batch: int = 3, n: int = 11, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n, dim, generator=g)
    size = torch.randint(1, 6, (batch, n), generator=g).double()
    size[0, -3:] = 0  # image 0 has padding
    return keys, size


def test_fresh_patches_keep_their_cosine_and_padding_stays_masked():
    keys, _ = _batch()
    size = torch.ones(keys.shape[:2], dtype=torch.double)
    size[0, -3:] = 0
    split = alternating_split(size > 0, 1)
    matches = best_matches(keys, split)
    weight = pair_weight(split, size, size_weighted=True)
    got = effective_matches(matches, split, weight)
    real = split.a_ok[:, :, None] & split.b_ok[:, None, :]
    assert torch.equal(got.scores[real], matches.scores[real])
    assert torch.equal(got.similarity, matches.similarity)
    assert torch.isneginf(got.scores[~real[:, :1, :].expand_as(real) & ~real]).all()


def test_size_weighting_is_theorem_1_over_cosine():
    """Effective similarity = 1 - (1 - cos) * 2 n_a n_b / (n_a + n_b), computed pair by pair."""
    keys, size = _batch(1)
    split = size_sorted_split(size, 1)
    matches = best_matches(keys, split)
    got = effective_matches(matches, split, pair_weight(split, size, size_weighted=True))
    unit = F.normalize(keys, dim=-1)
    for b in range(keys.shape[0]):
        for i in range(split.a_idx.shape[1]):
            if not split.a_ok[b, i]:
                assert got.similarity[b, i] == -math.inf
                continue
            best = -math.inf
            for j in range(split.b_idx.shape[1]):
                if not split.b_ok[b, j]:
                    continue
                pa, pb = int(split.a_idx[b, i]), int(split.b_idx[b, j])
                cos = float(unit[b, pa] @ unit[b, pb])
                na, nb = float(size[b, pa]), float(size[b, pb])
                want = 1 - (1 - cos) * 2 * na * nb / (na + nb)
                assert float(got.scores[b, i, j]) == pytest.approx(want, abs=1e-5)
                best = max(best, want)
            assert float(got.similarity[b, i]) == pytest.approx(best, abs=1e-5)


def test_uniform_attention_weighs_one_and_attention_makes_tokens_dearer():
    keys, _ = _batch(2)
    size = torch.ones(keys.shape[:2], dtype=torch.double)
    split = alternating_split(size > 0, 1)
    unprotected = torch.full((keys.shape[0],), keys.shape[1] - 1)
    uniform = torch.full(size.shape, 1.0 / (keys.shape[1] - 1), dtype=torch.double)
    weight = pair_weight(split, size, False, uniform, 0.5, unprotected)
    torch.testing.assert_close(weight, torch.ones_like(weight))
    # Seven times the average attention on one destination: with an average source the pair's
    # share is (1 + 7) / 2 = 4 times the average, so its dissimilarity doubles at power 0.5.
    focused = uniform.clone()
    dst = int(split.b_idx[0, 0])
    focused[0, dst] *= 7
    weight = pair_weight(split, size, False, focused, 0.5, unprotected)
    torch.testing.assert_close(weight[0, :, 0], torch.full_like(weight[0, :, 0], 2.0))
    assert torch.equal(weight[1:], torch.ones_like(weight[1:]))


def test_attention_weighting_needs_the_attention():
    keys, size = _batch()
    split = alternating_split(size > 0, 1)
    with pytest.raises(ValueError, match="class token's attention"):
        pair_weight(split, size, False, None, 0.5, None)


def test_per_head_keys_compare_by_the_mean_of_head_cosines():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 7, 4, generator=g)  # [B, H, N, d]
    metric = per_head_keys(keys)
    assert metric.shape == (2, 7, 12)
    got = F.normalize(metric, dim=-1) @ F.normalize(metric, dim=-1).transpose(1, 2)
    unit = F.normalize(keys, dim=-1)
    want = (unit @ unit.transpose(-1, -2)).mean(1)
    torch.testing.assert_close(got, want)


def test_keep_norm_gives_merged_tokens_the_mean_length_of_their_parts():
    x = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # protected token first
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0]])
    split = alternating_split(size > 0, 1)  # sources at positions 2 (size 2), destinations 1, 3
    keys = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    matches = best_matches(keys, split)  # position 2 matches position 1
    selected = torch.tensor([[True]])
    plain = merge_tokens(x, size, None, split, matches, selected, 1)
    kept = merge_tokens(x, size, None, split, matches, selected, 1, keep_norm=True)
    mean = torch.tensor([3.0, 2.0]) / 3  # (1 * [3, 0] + 2 * [0, 1]) / 3
    length = (1 * 3.0 + 2 * 1.0) / 3
    torch.testing.assert_close(plain.x[0, -2], mean)  # destinations last, in position order
    torch.testing.assert_close(kept.x[0, -2], mean / mean.norm() * length)
    assert torch.equal(kept.x[0, -1], x[0, 3]) and torch.equal(kept.size, plain.size)


def test_atm_defaults_are_the_papers_method():
    atm = ATM()
    assert (atm.keys, atm.size_weighted, atm.attention_power, atm.keep_norm) == ("mean", False, 0.0, False)
    assert atm.key_form == "mean" and not atm.needs_class_attention and not atm.keeps_norm


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"keys": "all"}, "keys must be"), ({"attention_power": -1}, "attention_power"), ({"attention_power": "x"}, "attention_power")],
)
def test_bad_cost_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        ATM(**settings)


REFINED = {"keys": "per_head", "size_weighted": True, "attention_power": 0.5, "keep_norm": True}


@torch.no_grad()
def test_refined_costs_in_a_patched_model_pack_batch_and_threshold_exactly():
    """Packed == padded, batch == single images, and every merged pair was above its threshold
    by the effective similarity the policy compared."""
    model = make_vit("deit_tiny_patch16_224")
    images = blocky_images(6, seed=5)
    settings = ATM_LENIENT | REFINED
    patch(model, "atm", ragged="padded", record_merges=True, **settings)
    padded = model(images)
    expected = merge_stats(model)
    assert (expected.tokens[:, -1] < expected.tokens[:, 0]).all()
    for record in expected.layers:
        merged = record.selected
        assert (record.similarity[merged] > record.threshold).all()
    patch(model, "atm", ragged="packed", **settings)
    torch.testing.assert_close(model(images), padded, atol=1e-4, rtol=1e-4)
    assert torch.equal(merge_stats(model).tokens, expected.tokens)
    for i in range(len(images)):
        torch.testing.assert_close(model(images[i : i + 1]), padded[i : i + 1], atol=1e-4, rtol=1e-4)
        assert torch.equal(merge_stats(model).tokens[0], expected.tokens[i])


@torch.no_grad()
def test_attention_power_changes_the_merges_and_is_counted():
    model = make_vit("deit_tiny_patch16_224")
    images = blocky_images(4, seed=2)
    patch(model, "atm", **ATM_LENIENT)
    model(images)
    plain = merge_stats(model)
    patch(model, "atm", attention_power=1.0, **ATM_LENIENT)
    model(images)
    weighted = merge_stats(model)
    assert not torch.equal(weighted.tokens, plain.tokens)
    assert (weighted.gflops_matching > plain.gflops_matching).all()  # the class attention is counted


def test_attention_power_needs_a_class_token():
    model = make_vit("vit_tiny_patch16_224", global_pool="avg", class_token=False, fc_norm=True)
    with pytest.raises(UnsupportedModelError, match="no class token; set attention_power 0"):
        patch(model, "atm", attention_power=0.5, **ATM_LENIENT)
