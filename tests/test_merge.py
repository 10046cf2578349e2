"""Pure merging functions: splits, matching, selection, the merge plan and the move, Theorem 1 (no timm)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from atm_lightning.merge import (
    ATM,
    EViT,
    NoMerge,
    ToMe,
    TokenState,
    alternating_split,
    batch_min,
    best_matches,
    class_attention,
    keep_count,
    key_features,
    make_merger,
    match_step,
    merge_error,
    padding_mask,
    plan,
    prune_step,
    size_split,
    threshold_schedule,
    top_r,
)
from atm_lightning.merge.merging import alternating_group_keys, mean_tokens, move_matrix

INF = float("inf")


def test_alternating_split_matches_tome_positions():
    split = alternating_split(8, protected=1, device=torch.device("cpu"))
    assert split.row_pos.tolist() == [[2, 4, 6]]
    assert split.col_pos.tolist() == [[1, 3, 5, 7]]
    # Two protected tokens (class + distillation) are excluded from both sets.
    split = alternating_split(8, protected=2, device=torch.device("cpu"))
    assert split.row_pos.tolist() == [[2, 4, 6]] and split.col_pos.tolist() == [[3, 5, 7]]
    # The slices name the same positions, for every protected count (registers: up to 5).
    values = torch.arange(9)[None]
    for protected in range(6):
        split = alternating_split(9, protected, torch.device("cpu"))
        rows, cols = split.take(values)
        assert rows.tolist() == split.row_pos.tolist() and cols.tolist() == split.col_pos.tolist()
        assert set(rows[0].tolist()) | set(cols[0].tolist()) == set(range(protected, 9))


def test_size_split_takes_each_images_smaller_half_as_sources():
    torch.manual_seed(0)
    size = torch.randint(1, 6, (4, 15)).float()
    size[2, 11:] = 0  # padding
    size[3, 6:] = 0
    free = (size[:, 1:] > 0).sum(1)
    split = size_split(size, free, protected=1, neg=padding_mask(torch.log(size)[:, None, None], True))
    for i in range(4):
        m = int(free[i])
        rows = split.row_pos[i][split.row_ok[i]].tolist()
        cols = split.col_pos[i][split.col_mask[i, 0] == 0].tolist()
        assert len(rows) == math.ceil(m / 2) and len(cols) == m // 2
        assert set(rows) | set(cols) == set(range(1, m + 1))
        assert size[i, rows].max() <= size[i, cols].min()
    # Stable: equal sizes keep position order; one count for every image needs no row mask.
    split = size_split(torch.ones(1, 7), 6, protected=1, neg=None)
    assert split.row_pos.tolist() == [[1, 2, 3]] and split.row_ok is None
    assert split.col_pos[0][split.col_mask[0, 0] == 0].tolist() == [4, 5, 6]


def test_key_features_are_unit_rows_whose_products_are_similarities():
    torch.manual_seed(1)
    keys = torch.randn(2, 3, 5, 4)  # [B, H, N, d]
    rows, scale = key_features(keys, per_head=False)
    mean = torch.nn.functional.normalize(keys.mean(1), dim=-1)
    torch.testing.assert_close(rows @ rows.transpose(1, 2) * scale, mean @ mean.transpose(1, 2))
    rows, scale = key_features(keys, per_head=True)
    heads = torch.nn.functional.normalize(keys, dim=-1)
    torch.testing.assert_close(rows @ rows.transpose(1, 2) * scale, (heads @ heads.transpose(-1, -2)).mean(1))


def test_best_matches_masks_columns_and_breaks_ties_to_the_first():
    rows = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), dim=-1)
    cols = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.1], [1.0, 0.1], [0.0, 1.0]]]), dim=-1)
    matches = best_matches(rows, cols, 1.0, None)
    assert matches.dst.tolist() == [[0, 2]] and matches.offset == 0.0  # ties go to the first column
    mask = torch.tensor([[[-INF, 0.0, -INF]]])
    matches = best_matches(rows, cols, 1.0, mask)
    assert matches.dst.tolist() == [[1, 1]]
    # With weights the score is the effective similarity minus one: 1 - (1 - cos) * w - 1.
    weight = torch.full((1, 2, 3), 2.0)
    weighted = best_matches(rows, cols, 1.0, mask, weight)
    cos = (rows @ cols.transpose(1, 2))[0, :, 1]
    torch.testing.assert_close(weighted.score[0], -(1 - cos) * 2)
    assert weighted.offset == -1.0


def test_threshold_schedule_follows_formula_and_floor():
    thetas = threshold_schedule(alpha=1.0, beta=0.1, theta_min=0.6, depth=12)
    assert thetas[0] == 1.0
    assert thetas[1] == pytest.approx(1.0 - (math.exp(0.1) - 1))
    assert thetas[3] == pytest.approx(1.0 - (math.exp(0.3) - 1))
    assert thetas[5] == 0.6  # 1 - (e^0.5 - 1) = 0.35 is below the floor
    assert thetas[-1] == 0.6 and min(thetas) == 0.6
    assert all(a >= b for a, b in itertools.pairwise(thetas))


def test_top_r_and_batch_min():
    score = torch.tensor([[0.9, 0.1, 0.95, -INF], [0.2, 0.99, 0.3, 0.98]])
    assert top_r(score, 2).tolist() == [[True, False, True, False], [False, True, False, True]]
    assert top_r(score, torch.tensor([1, 3])).tolist() == [[False, False, True, False], [False, True, True, True]]
    chosen = batch_min(score > 0.92, score)  # counts 1 and 2 -> each image merges its single best
    assert chosen.tolist() == [[False, False, True, False], [False, True, False, False]]
    assert batch_min(score > 0.5, score).sum(1).tolist() == [2, 2]


def test_plan_orders_protected_sources_destinations_and_leaves_unmerged_images_as_they_were():
    # Image 0: position 2 (a source) merges into 1; image 1 merges nothing; image 2 is padded.
    size = torch.tensor([[1.0, 1, 3, 1, 1, 1], [1.0, 1, 1, 1, 1, 1], [1.0, 2, 1, 1, 0, 0]])
    target = torch.arange(6).repeat(3, 1)
    target[0, 2] = 1
    target[2, 2] = 3
    keys = alternating_group_keys(6, 1, torch.device("cpu"))
    moves = plan(size, target, keys, torch.tensor([5, 5, 3]), protected=1, merges=None)
    assert moves.width is None and int(moves.widest()) == 5 and moves.free.tolist() == [4, 5, 2]
    # Output rows: protected, unmerged source 4, destinations 1, 3, 5 (source 2 goes with 1) ...
    assert moves.out_row[0].tolist() == [0, 2, 2, 3, 1, 4]
    assert moves.out_row[1].tolist() == [0, 1, 2, 3, 4, 5]  # ... nothing merged: the order as it was ...
    assert moves.out_row[2, :4].tolist() == [0, 1, 2, 2]  # ... and padding past the image's tokens
    assert (moves.out_row[2, 4:] >= 3).all()
    new_size = move_matrix(moves, size, 6).sum(-1)
    assert new_size.tolist() == [[1, 1, 4, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 2, 2, 0, 0, 0]]
    # The width shrinks to the widest image once nobody holds more.
    narrow = plan(size[[0, 2]], target[[0, 2]], keys, torch.tensor([5, 3]), protected=1, merges=None)
    assert int(narrow.widest()) + 1 == 5 and move_matrix(narrow, size[[0, 2]], 5).shape == (2, 5, 6)


def test_mean_tokens_are_size_weighted_means_and_conserve_mass():
    torch.manual_seed(2)
    size = torch.tensor([[1.0, 1, 3, 1, 1, 1], [1.0, 2, 1, 1, 0, 0]])
    x = torch.randn(2, 6, 4) * (size > 0)[..., None]
    target = torch.arange(6).repeat(2, 1)
    target[0, 2], target[0, 4], target[1, 2] = 1, 1, 1
    moves = plan(size, target, alternating_group_keys(6, 1, x.device), torch.tensor([5, 3]), 1, None)
    matrix = move_matrix(moves, size, 6)
    new_size = matrix.sum(-1)
    out = mean_tokens(x, matrix, new_size)
    torch.testing.assert_close((out * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    merged = (x[0, 1] + 3 * x[0, 2] + x[0, 4]) / 5  # both sources of image 0 went to destination 1
    assert moves.out_row[0].tolist() == [0, 1, 1, 2, 1, 3]
    torch.testing.assert_close(out[0, 1], merged)
    torch.testing.assert_close(out[0, 2], x[0, 3])
    assert out[1, 3:].abs().sum() == 0 and (new_size[1, 3:] == 0).all()  # padding stays zero
    # keep_norm: merged tokens at their parts' size-weighted mean length, others untouched.
    kept = mean_tokens(x, matrix, new_size, keep_norm=True)
    length = (x[0, 1].norm() + 3 * x[0, 2].norm() + x[0, 4].norm()) / 5
    torch.testing.assert_close(kept[0, 1].norm(), length)
    torch.testing.assert_close(kept[0, 1] / kept[0, 1].norm(), merged / merged.norm())
    torch.testing.assert_close(kept[0, 2], x[0, 3])


def _apply(move):
    """The move applied at the width the host knows or reads."""
    width = move.plan.width if move.plan.width is not None else int(move.plan.widest()) + move.tokens.protected
    return move.apply(width)


def _state(x, size, protected):
    free = (size[:, protected:] > 0).sum(1)
    return TokenState(x, free, protected, size)


def test_match_step_equals_merging_each_image_alone():
    """A ragged batch decides and merges every image as that image alone would (gradients too)."""
    torch.manual_seed(5)
    batch, n, dim, heads = 5, 13, 6, 2
    size = torch.randint(1, 5, (batch, n)).float()
    size[1, 9:] = 0  # images 1 and 3 carry padding
    size[3, 6:] = 0
    x = (torch.randn(batch, n, dim) * (size > 0)[..., None]).requires_grad_()
    keys = torch.randn(batch, heads, n, 4)
    attention = torch.rand(batch, n) * (size > 0)
    attention = attention / attention.sum(1, keepdim=True)
    policy = ATM(alpha=0.3, beta=0.0, theta_min=0.3, split_layer=1, keys="per_head", size_weighted=True,
                 attention_power=0.5, keep_norm=True)  # fmt: skip
    neg = padding_mask(torch.log(size)[:, None, None], True)
    merged = _apply(match_step(policy, 0, _state(x, size, 2), keys, attention, neg, 2)[0])
    weights = torch.randn(merged.x.shape)
    loss, expected_loss = (merged.x * weights).sum(), 0.0
    for b in range(batch):
        real = int((size[b] > 0).sum())
        alone = _apply(match_step(
            policy, 0, _state(x[b : b + 1, :real], size[b : b + 1, :real], 2), keys[b : b + 1, :, :real],
            attention[b : b + 1, :real], None, 2,
        )[0])  # fmt: skip
        count = alone.x.shape[1]
        assert int(merged.free[b]) + 2 == count
        torch.testing.assert_close(merged.x[b, :count], alone.x[0])
        torch.testing.assert_close(merged.size[b, :count], alone.size[0])
        assert (merged.x[b, count:] == 0).all() and (merged.size[b, count:] == 0).all()
        expected_loss = expected_loss + (alone.x[0] * weights[b, :count]).sum()
    assert merged.free.min() < merged.free.max()  # the batch did end up ragged
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    torch.testing.assert_close(grad, expected_grad)


def test_tome_merges_r_per_image_and_knows_the_width_without_reading_it():
    torch.manual_seed(6)
    x, keys = torch.randn(3, 11, 4), torch.randn(3, 2, 11, 4)
    move, _ = match_step(ToMe(r=3), 0, TokenState(x, 10, 1), keys, None, None, 1)
    assert move.plan.width == 8  # no host read
    merged = move.apply(move.plan.width)
    assert merged.free == 7 and merged.x.shape == (3, 8, 4)
    torch.testing.assert_close(merged.size.sum(1), torch.full((3,), 11.0))


def test_theorem1_identity():
    torch.manual_seed(2)
    x_i, x_j = torch.randn(100, 16, dtype=torch.float64), torch.randn(100, 16, dtype=torch.float64)
    for n_i, n_j in [(1, 1), (3, 7), (40, 2)]:
        lhs, rhs = merge_error(x_i, x_j, n_i, n_j)
        torch.testing.assert_close(lhs, rhs)
    u_i = torch.nn.functional.normalize(x_i, dim=-1)
    u_j = torch.nn.functional.normalize(x_j, dim=-1)
    _, rhs = merge_error(u_i, u_j, 5, 5)
    cos = (u_i * u_j).sum(-1)
    torch.testing.assert_close(rhs, 5 * 5 / 10 * 2 * (1 - cos))


@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        ("tome", {"r": -1}, "non-negative integer"),
        ("tome", {"r": 2.5}, "non-negative integer"),
        ("atm", {"beta": -0.1}, "beta must be >= 0"),
        ("atm", {"theta_min": -1.5}, "theta_min must be >= -1"),
        ("atm", {"alpha": 0.5, "theta_min": 0.8}, r"alpha \(0.5\) must be >= theta_min \(0.8\)"),
        ("atm", {"alpha": float("nan")}, "finite number"),
        ("atm", {"split_layer": 0}, "split_layer"),
        ("atm", {"batch_rule": "mean"}, "batch_rule"),
        ("atom", {}, "unknown merging method 'atom'"),
    ],
)
def test_bad_settings_raise_one_clear_error(method, settings, message):
    with pytest.raises(ValueError, match=message):
        make_merger(method, **settings)


@pytest.mark.parametrize(("alpha", "theta_min"), [(1.0, 2.0), (0.5, 1.0), (0.9, 1.5)])
def test_theta_min_of_1_or_more_disables_merging_whatever_alpha(alpha, theta_min):
    atm = ATM(alpha=alpha, beta=0.02, theta_min=theta_min)
    assert not atm.merges
    assert min(atm.thresholds(12)) >= 1.0


def test_merges_only_when_some_threshold_falls_below_1():
    assert ATM(alpha=1.0, beta=0.02, theta_min=0.8).merges
    assert ATM(alpha=0.95, beta=0.0, theta_min=0.8).merges
    assert not ATM(alpha=1.0, beta=0.0, theta_min=0.8).merges  # every threshold stays at alpha = 1


def test_blocks_that_can_merge_nothing():
    """The block loop skips the step where ``merges_in`` is False: it must be False only there."""
    atm = ATM(alpha=1.0, beta=0.02, theta_min=0.8)
    assert [atm.merges_in(layer) for layer in range(3)] == [False, True, True]  # thresholds 1, 0.98, 0.96
    assert all(ATM(alpha=0.99, beta=0.0, theta_min=0.8).merges_in(layer) for layer in range(12))
    assert not any(ATM(alpha=1.0, beta=0.02, theta_min=1.0).merges_in(layer) for layer in range(12))
    assert [ToMe(r=[0, 3, 0, 1]).merges_in(layer) for layer in range(4)] == [False, True, False, True]
    assert [EViT(prune_layers=[2]).merges_in(layer) for layer in range(3)] == [False, True, False]
    assert not EViT(keep_rate=1.0, prune_layers=[2]).merges_in(1)
    assert not NoMerge().merges_in(0)


def test_depth_dependent_checks():
    with pytest.raises(ValueError, match="3 entries but the model has 12 blocks"):
        ToMe(r=[1, 2, 3]).check(12)
    with pytest.raises(ValueError, match="past the model's 12 blocks"):
        ATM(split_layer=14).check(12)
    ATM(split_layer=13).check(12)
    with pytest.raises(TypeError, match="Valid settings"):
        make_merger("tome", alpha=1.0)


def test_prune_keeps_most_attended_and_fuses_the_rest_by_attention():
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(2, 1, 2)
    size = torch.tensor([[1.0, 1, 2, 1, 1, 1], [1.0, 1, 1, 1, 3, 1]])
    attention = torch.tensor([[0.3, 0.05, 0.3, 0.1, 0.15, 0.1], [0.4, 0.3, 0.1, 0.05, 0.1, 0.05]])
    assert keep_count(0.5, 5) == 3
    source = torch.eye(6).expand(2, 6, 6)
    tokens = TokenState(x, 5, 1, size, source=source)
    out = _apply(prune_step(EViT(keep_rate=0.5, prune_layers=[1]), 0, tokens, attention, 1))
    assert out.free == 4 and out.x.shape == (2, 5, 2)
    # Image 0 keeps positions 2, 4 and one of the 0.1 ties, in position order, and fuses the rest.
    assert out.x[0, :2, 0].tolist() == [0.0, 2.0]
    kept = set(out.x[0, 1:4, 0].tolist())
    assert {2.0, 4.0} <= kept
    dropped = sorted({1.0, 2.0, 3.0, 4.0, 5.0} - kept)
    w = attention[0, [int(v) for v in dropped]]
    assert out.x[0, 4, 0].item() == pytest.approx(float((w * torch.tensor(dropped)).sum() / w.sum()))
    assert out.size[0].sum() == size[0].sum()
    assert out.source[0, 4].nonzero().flatten().tolist() == [int(v) for v in dropped]
    # Image 1 keeps 1, 2 and 4 (the tie at 0.1 broken by the sort), fuses 3 and 5 with sizes summed.
    assert out.size[1].tolist()[-1] == 2.0


def test_class_attention_is_a_head_averaged_distribution():
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 7, 4)
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 5:] = float("-inf")
    attn = class_attention(q, k, 0.5, bias)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2))
    assert (attn[1, 5:] == 0).all()
    manual = ((q * 0.5) @ k.transpose(-1, -2)).softmax(-1).mean(1)[:, 0]
    torch.testing.assert_close(attn[0], manual[0])


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"keep_rate": 0.0}, r"in \(0, 1\]"), ({"keep_rate": 1.5}, r"in \(0, 1\]"), ({"prune_layers": [0]}, ">= 1")],
)
def test_bad_evit_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        make_merger("evit", **settings)
