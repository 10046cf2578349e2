"""Pure merging functions: splits, selection, weighted merge, Theorem 1 (no timm)."""

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
    alternating_split,
    batch_min,
    best_matches,
    class_attention,
    keep_count,
    make_merger,
    merge_error,
    merge_tokens,
    prune_inattentive,
    size_sorted_split,
    threshold_schedule,
    top_r,
)
from atm_lightning.merge import with_trash_row


def test_alternating_split_matches_tome_positions():
    valid = torch.ones(1, 8, dtype=torch.bool)
    split = alternating_split(valid, num_protected=1)
    assert split.a_idx.tolist() == [[2, 4, 6]]
    assert split.b_idx.tolist() == [[1, 3, 5, 7]]
    # Two protected tokens (class + distillation) are excluded from both sets.
    split = alternating_split(valid, num_protected=2)
    assert split.a_idx.tolist() == [[2, 4, 6]]
    assert split.b_idx.tolist() == [[3, 5, 7]]
    # The slices name the same positions, for every protected count (registers: up to 5).
    positions = torch.arange(9)
    for protected in range(6):
        split = alternating_split(torch.ones(2, 9, dtype=torch.bool), num_protected=protected)
        assert positions[split.a_slice].tolist() == split.a_idx[0].tolist()
        assert positions[split.b_slice].tolist() == split.b_idx[0].tolist()


def test_alternating_split_points_padding_at_trash_slot():
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    split = alternating_split(valid, num_protected=1)
    assert split.a_ok.tolist() == [[True, True, True], [True, True, False]]
    assert split.a_idx[1].tolist() == [2, 4, 8]
    assert split.b_idx[1].tolist() == [1, 3, 8, 8]


def test_size_sorted_split_takes_smaller_half_as_sources():
    torch.manual_seed(0)
    size = torch.randint(1, 6, (4, 15)).float()
    size[2, 11:] = 0  # padding
    size[3, 6:] = 0
    split = size_sorted_split(size, num_protected=1)
    for i in range(size.shape[0]):
        m = int((size[i, 1:] > 0).sum())
        a = split.a_idx[i][split.a_ok[i]]
        b = split.b_idx[i][split.b_ok[i]]
        assert len(a) == math.ceil(m / 2) and len(b) == m // 2
        assert set(a.tolist()) | set(b.tolist()) == set(range(1, m + 1))
        assert size[i, a].max() <= size[i, b].min()
    # Stable: equal sizes keep position order.
    split = size_sorted_split(torch.ones(1, 7), num_protected=1)
    assert split.a_idx.tolist() == [[1, 2, 3]] and split.b_idx.tolist() == [[4, 5, 6]]


def test_best_matches_masks_missing_slots():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.9, 0.1], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, True, True, False]])
    split = alternating_split(valid, num_protected=1)  # A = [2, 4(pad)], B = [1, 3]
    matches = best_matches(with_trash_row(metric), split)
    assert matches.similarity[0, 1] == float("-inf")
    cos_2_3 = (0.1) / math.sqrt(0.82)
    assert matches.similarity[0, 0].item() == pytest.approx(cos_2_3, abs=1e-6)
    assert split.b_idx[0, matches.dst[0, 0]].item() == 3


def test_matches_keep_every_score_and_find_destinations_lazily():
    """Similarity is the row maximum over real destinations; ``dst_of`` equals the full ``dst``."""
    torch.manual_seed(2)
    size = torch.ones(4, 15)
    size[1, 10:] = 0
    size[3, 4:] = 0
    split = alternating_split(size > 0, num_protected=1)
    matches = best_matches(torch.randn(4, 15, 6), split)
    real_scores = matches.scores.masked_fill(~split.a_ok[..., None], float("-inf"))
    values, indices = real_scores.max(dim=-1)
    assert torch.equal(matches.similarity, values)
    assert torch.equal(matches.dst[split.a_ok], indices[split.a_ok])
    assert (matches.scores[~split.b_ok[:, None, :].expand_as(matches.scores)] == float("-inf")).all()
    image, slot = split.a_ok.nonzero().unbind(1)
    assert torch.equal(matches.dst_of(image, slot), matches.dst[image, slot])
    assert matches.dst_of(image[:0], slot[:0]).shape == (0,)
    # Ties go to the first destination, as in max(dim).
    tie = best_matches(torch.ones(1, 5, 2), alternating_split(torch.ones(1, 5, dtype=bool), 1))
    assert tie.dst.tolist() == [[0, 0]] and tie.dst_of(torch.tensor([0]), torch.tensor([1])).tolist() == [0]


def test_threshold_schedule_follows_formula_and_floor():
    thetas = threshold_schedule(alpha=1.0, beta=0.1, theta_min=0.6, depth=12)
    assert thetas[0] == 1.0
    assert thetas[1] == pytest.approx(1.0 - (math.exp(0.1) - 1))
    assert thetas[3] == pytest.approx(1.0 - (math.exp(0.3) - 1))
    assert thetas[5] == 0.6  # 1 - (e^0.5 - 1) = 0.35 is below the floor
    assert thetas[-1] == 0.6 and min(thetas) == 0.6
    assert all(a >= b for a, b in itertools.pairwise(thetas))


def test_top_r_and_batch_min():
    sim = torch.tensor([[0.9, 0.1, 0.95, float("-inf")], [0.2, 0.99, 0.3, 0.98]])
    assert top_r(sim, 2).tolist() == [[True, False, True, False], [False, True, False, True]]
    # r larger than the real slots never selects a missing slot.
    assert top_r(sim, 4)[0].tolist() == [True, True, True, False]
    above = sim > 0.5  # counts 2 and 2
    chosen = batch_min(sim > 0.92, sim)  # counts 1 and 2 -> each image merges its single best
    assert chosen.tolist() == [[False, False, True, False], [False, True, False, False]]
    assert (sim[chosen] > 0.92).all()
    assert batch_min(above, sim).sum(1).tolist() == [2, 2]


def test_merge_tokens_weighted_mean_sizes_and_order():
    x = torch.tensor([[[10.0], [1.0], [2.0], [3.0], [4.0], [5.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0]])
    valid = size > 0
    split = alternating_split(valid, num_protected=1)  # A = [2, 4], B = [1, 3, 5]
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
    matches = best_matches(with_trash_row(metric), split)
    selected = torch.tensor([[True, False]])  # merge position 2 (size 3) into its match, position 1
    source = torch.eye(6).expand(1, 6, 6)
    out = merge_tokens(x, size, source, split, matches, selected, num_protected=1)
    # Order: protected, unmerged sources (position 4), destinations (1, 3, 5).
    assert out.count.tolist() == [5]
    assert out.size.tolist() == [[1.0, 1.0, 4.0, 1.0, 1.0]]
    assert out.x[0, :, 0].tolist() == pytest.approx([10.0, 4.0, (1.0 + 3 * 2.0) / 4, 3.0, 5.0])
    assert out.source[0, 2].tolist() == [0, 1, 1, 0, 0, 0]
    assert out.source.sum(1).tolist() == [[1.0] * 6]


def test_merge_conserves_mass_and_pads_ragged_images():
    torch.manual_seed(1)
    x = torch.randn(3, 11, 4)
    size = torch.randint(1, 4, (3, 11)).float()
    split = alternating_split(size > 0, num_protected=1)
    matches = best_matches(with_trash_row(torch.randn(3, 11, 8)), split)
    selected = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]])
    out = merge_tokens(x, size, None, split, matches, selected, num_protected=1)
    assert out.count.tolist() == [6, 11, 9]
    assert out.x.shape[1] == 11
    assert (out.size[0, 6:] == 0).all() and (out.size[2, 9:] == 0).all()
    torch.testing.assert_close(out.size.sum(1), size.sum(1))
    torch.testing.assert_close((out.x * out.size[..., None]).sum(1), (x * size[..., None]).sum(1))
    # An image that merges nothing is returned exactly as it came, order included.
    assert torch.equal(out.x[1], x[1]) and torch.equal(out.size[1], size[1])


def _merge_one_image(x, size, source, split, matches, selected, b, protected):
    """Straightforward per-image merge: the definition merge_tokens must equal."""
    a_pos = [int(p) for p, ok in zip(split.a_idx[b], split.a_ok[b]) if ok]
    b_pos = [int(p) for p, ok in zip(split.b_idx[b], split.b_ok[b]) if ok]
    chosen = {a_pos[i]: b_pos[int(matches.dst[b, i])] for i in range(len(a_pos)) if selected[b, i]}
    prefix = [p for p in range(protected) if size[b, p] > 0]
    rest = [p for p in a_pos if p not in chosen]
    order = prefix + rest + b_pos if chosen else sorted(prefix + rest + b_pos)
    rows, sizes, sources = [], [], []
    for p in order:
        takers = [a for a, d in chosen.items() if d == p]
        total = size[b, p] + sum(size[b, a] for a in takers)
        if takers:
            rows.append((size[b, p] * x[b, p] + sum(size[b, a] * x[b, a] for a in takers)) / total)
        else:
            rows.append(x[b, p])
        sizes.append(total)
        if source is not None:
            sources.append(source[b, p] + sum((source[b, a] for a in takers), torch.zeros_like(source[b, p])))
    return torch.stack(rows), torch.stack(sizes), torch.stack(sources) if sources else None


@pytest.mark.parametrize(("sort_images", "packed"), [(False, False), (True, False), (True, True)])
def test_merge_tokens_equals_per_image_definition(sort_images, packed):
    """Batched merge (ragged images, padding, reordering, packed rows, gradients) equals a per-image loop."""
    torch.manual_seed(5)
    batch, n, dim = 5, 13, 6
    size = torch.randint(1, 5, (batch, n)).float()
    size[1, 9:] = 0  # ragged: images 1 and 3 already carry padding
    size[3, 6:] = 0
    x = (torch.randn(batch, n, dim) * (size > 0)[..., None]).requires_grad_()
    source = torch.rand(batch, n, 7) * (size > 0)[..., None]
    split = alternating_split(size > 0, num_protected=2)
    matches = best_matches(with_trash_row(torch.randn(batch, n, 4)), split)
    selected = torch.rand(split.a_idx.shape) < 0.6
    selected[2] = False  # one image merges nothing
    x_in = x[size > 0] if packed else x  # packed: the real tokens of each image, one image after another
    out = merge_tokens(x_in, size, source, split, matches, selected, 2, sort_images=sort_images, pack=packed)
    out_x = out.x
    if packed:  # unpack to compare: image i's tokens follow those of images before it
        assert out.x.shape == (int(out.count.sum()), dim)
        out_x = torch.zeros(batch, out.size.shape[1], dim).masked_scatter(out.size[..., None] > 0, out.x)

    order = out.image_order if sort_images else torch.arange(batch)
    if sort_images:
        assert sorted(order.tolist()) == list(range(batch))
        assert out.count.tolist() == sorted(out.count.tolist(), reverse=True)
    else:
        assert out.image_order is None
    weights = torch.randn(out_x.shape)
    expected_loss = 0.0
    for row, b in enumerate(order.tolist()):
        ex, es, esrc = _merge_one_image(x, size, source, split, matches, selected & split.a_ok, b, 2)
        count = len(es)
        assert out.count[row] == count
        torch.testing.assert_close(out_x[row, :count], ex)
        torch.testing.assert_close(out.size[row, :count], es)
        torch.testing.assert_close(out.source[row, :count], esrc)
        assert (out_x[row, count:] == 0).all() and (out.size[row, count:] == 0).all()
        assert (out.source[row, count:] == 0).all()
        expected_loss = expected_loss + (ex * weights[row, :count]).sum()
    (grad,) = torch.autograd.grad((out_x * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    torch.testing.assert_close(grad, expected_grad)


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
    # theta_min 2 was refused as "alpha (1.0) must be >= theta_min", blaming the wrong setting.
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
    size = torch.tensor([[1.0, 1, 2, 1, 1, 1], [1.0, 1, 1, 1, 0, 0]])  # image 1 is padded
    attention = torch.tensor([[0.3, 0.05, 0.3, 0.1, 0.15, 0.1], [0.4, 0.3, 0.1, 0.2, 0.0, 0.0]])
    keep = keep_count(0.5, torch.tensor([5, 3]))
    assert keep.tolist() == [3, 2]
    source = torch.eye(6).expand(2, 6, 6)
    out = prune_inattentive(x, size, source, attention, keep, num_protected=1)
    assert out.count.tolist() == [5, 4]
    # Image 0 keeps positions 2, 4 and one of the 0.1 ties, in position order; fuses 1 and the other.
    assert out.x[0, :4, 0].tolist()[:2] == [0.0, 2.0]
    kept = set(out.x[0, 1:4, 0].tolist())
    assert {2.0, 4.0} <= kept
    dropped = sorted({1.0, 2.0, 3.0, 4.0, 5.0} - kept)
    w = attention[0, [int(v) for v in dropped]]
    expected = (w * torch.tensor(dropped)).sum() / w.sum()
    assert out.x[0, 4, 0].item() == pytest.approx(expected.item())
    assert out.size[0].sum() == size[0].sum()
    # Image 1 keeps 1 and 3, fuses 2 alone (weight irrelevant), then one padding slot.
    assert out.x[1, :4, 0].tolist() == [0.0, 1.0, 3.0, 2.0]
    assert out.size[1].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert out.source[0, 4].nonzero().flatten().tolist() == [int(v) for v in dropped]
    assert out.source[1, 3].nonzero().flatten().tolist() == [2]


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
