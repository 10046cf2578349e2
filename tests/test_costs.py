"""Merge costs beyond plain cosine: size weighting, attention weighting, per-head keys, kept norms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atm_lightning import UnsupportedModelError, merge_stats, patch
from atm_lightning.merge import ATM, alternating_split, best_matches, key_features, padding_mask, pair_weight, size_split
from tests.helpers import ATM_LENIENT, blocky_images, make_vit


def _batch(seed: int = 0, batch: int = 3, n: int = 11, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(batch, n, dim, generator=g, dtype=torch.double), dim=-1)
    size = torch.randint(1, 6, (batch, n), generator=g).double()
    size[0, -3:] = 0  # image 0 has padding
    return keys, size


def _masks(size: torch.Tensor):
    neg = padding_mask(torch.log(size)[:, None, None], True)
    return neg, (size[:, 1:] > 0).sum(1)


def test_fresh_patches_keep_their_cosine():
    keys, _ = _batch()
    size = torch.ones(keys.shape[:2], dtype=torch.double)
    split = alternating_split(keys.shape[1], 1, keys.device)
    weight = pair_weight(split, size, size_weighted=True)
    torch.testing.assert_close(weight, torch.ones_like(weight))
    rows, cols = split.take(keys)
    plain = best_matches(rows, cols, 1.0, None)
    weighted = best_matches(rows, cols, 1.0, None, weight)
    torch.testing.assert_close(weighted.score - weighted.offset, plain.score)
    assert torch.equal(weighted.dst, plain.dst)


@pytest.mark.parametrize("attention_power", [0.0, 0.5, 1.0])
def test_weights_are_theorem_1_and_attention_share_over_cosine(attention_power):
    """Effective similarity = 1 - (1 - cos) * w, w = 2 n_a n_b / (n_a + n_b) * (M a_pair)^p, pair by pair."""
    keys, size = _batch(1)
    neg, free = _masks(size)
    split = size_split(size, free, 1, neg)
    g = torch.Generator().manual_seed(4)
    attention = torch.rand(size.shape, generator=g, dtype=torch.double) * (size > 0)
    attention = attention / attention.sum(1, keepdim=True)
    weight = pair_weight(split, size, True, attention if attention_power else None, attention_power, free)
    rows, cols = split.take(keys)
    got = best_matches(rows, cols, 1.0, split.col_mask, weight)
    for b in range(keys.shape[0]):
        m = int(free[b])
        for i in range(split.num_rows):
            if not split.row_ok[b, i]:
                continue
            best = -math.inf
            for j in range(split.col_pos.shape[1]):
                if split.col_mask[b, 0, j] != 0:
                    continue
                pa, pb = int(split.row_pos[b, i]), int(split.col_pos[b, j])
                cos = float(keys[b, pa] @ keys[b, pb])
                na, nb = float(size[b, pa]), float(size[b, pb])
                w = 2 * na * nb / (na + nb)
                if attention_power:
                    share = m * (float(attention[b, pa]) * nb + float(attention[b, pb]) * na) / (na + nb)
                    w *= max(share, 1e-6) ** attention_power
                best = max(best, 1 - (1 - cos) * w)
            assert float(got.score[b, i] - got.offset) == pytest.approx(best, abs=1e-5)


def test_uniform_attention_weighs_one_and_attention_makes_tokens_dearer():
    keys, _ = _batch(2)
    size = torch.ones(keys.shape[:2], dtype=torch.double)
    split = alternating_split(keys.shape[1], 1, keys.device)
    unprotected = keys.shape[1] - 1
    uniform = torch.full(size.shape, 1.0 / unprotected, dtype=torch.double)
    weight = pair_weight(split, size, False, uniform, 0.5, unprotected)
    torch.testing.assert_close(weight, torch.ones_like(weight))
    # Seven times the average attention on one destination: with an average source the pair's
    # share is (1 + 7) / 2 = 4 times the average, so its dissimilarity doubles at power 0.5.
    focused = uniform.clone()
    focused[0, int(split.col_pos[0, 0])] *= 7
    weight = pair_weight(split, size, False, focused, 0.5, unprotected)
    torch.testing.assert_close(weight[0, :, 0], torch.full_like(weight[0, :, 0], 2.0))
    torch.testing.assert_close(weight[1:], torch.ones_like(weight[1:]))


def test_attention_weighting_needs_the_attention():
    keys, size = _batch()
    split = alternating_split(keys.shape[1], 1, keys.device)
    with pytest.raises(ValueError, match="class token's attention"):
        pair_weight(split, size, False, None, 0.5, None)


def test_per_head_keys_compare_by_the_mean_of_head_cosines():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 7, 4, generator=g)  # [B, H, N, d]
    rows, scale = key_features(keys, per_head=True)
    assert rows.shape == (2, 7, 12)
    unit = F.normalize(keys, dim=-1)
    torch.testing.assert_close(rows @ rows.transpose(1, 2) * scale, (unit @ unit.transpose(-1, -2)).mean(1))


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
def test_refined_costs_in_a_patched_model_batch_and_threshold_exactly():
    """A batch merges every image as it merges alone, and every merged pair was above its threshold
    by the effective similarity the policy compared."""
    model = make_vit("deit_tiny_patch16_224")
    images = blocky_images(6, seed=5)
    settings = ATM_LENIENT | REFINED
    patch(model, "atm", record_merges=True, **settings)
    padded = model(images)
    expected = merge_stats(model)
    assert (expected.tokens[:, -1] < expected.tokens[:, 0]).all()
    for record in expected.layers:
        merged = record.selected
        assert (record.similarity[merged] > record.threshold).all()
    patch(model, "atm", fused=False, **settings)
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
