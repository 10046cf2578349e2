"""The fidelity report: paired bootstrap of the top-1 change, per-batch comparison sums."""

from __future__ import annotations

import math

import pytest
import torch

from atm_lightning.fidelity import compare_batch, summary, top1_change


def test_no_change_has_a_zero_width_interval():
    change = top1_change(0, 0, 1000)
    assert (change.change, change.low, change.high, change.width) == (0.0, 0.0, 0.0, 0.0)
    assert change.lossless


def test_interval_matches_the_normal_approximation_for_many_images():
    lost, gained, total = 300, 200, 10_000
    change = top1_change(lost, gained, total)
    p_lost, p_gained = lost / total, gained / total
    mean = p_gained - p_lost
    sd = math.sqrt((p_gained + p_lost - mean**2) / total)
    assert change.change == pytest.approx(100 * mean)
    assert change.low == pytest.approx(100 * (mean - 1.96 * sd), abs=0.03)
    assert change.high == pytest.approx(100 * (mean + 1.96 * sd), abs=0.03)
    assert not change.lossless  # -1 point on 10k images with 5% of predictions changed: a real loss


def test_small_changes_on_few_images_are_not_distinguishable_from_zero():
    change = top1_change(12, 9, 500)
    assert change.low < 0 < change.high and change.lossless
    assert change.width > 1.0  # a thousand-image figure says little to within a point


def test_bootstrap_is_deterministic_and_checks_counts():
    assert top1_change(20, 15, 1000) == top1_change(20, 15, 1000)
    with pytest.raises(ValueError, match="lost \\+ gained <= total"):
        top1_change(600, 500, 1000)
    with pytest.raises(ValueError, match="at least one image"):
        top1_change(0, 0, 0)


def test_compare_batch_counts_and_kl():
    dense = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    merged = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 1])
    sums = compare_batch(merged, dense, targets)
    # image 0: same and right; 1: lost (dense right); 2: both wrong; 3: gained.
    assert (int(sums["agree"]), int(sums["dense_right"]), int(sums["lost"]), int(sums["gained"])) == (2, 2, 1, 1)
    p = torch.log_softmax(dense.double(), -1)
    q = torch.log_softmax(merged.double(), -1)
    assert float(sums["kl"]) == pytest.approx(float((p.exp() * (p - q)).sum()))
    row = summary({name: float(value) for name, value in sums.items()}, 4)
    assert row["agreement"] == 50.0 and row["top1_dense"] == 50.0 and row["top1_change"] == 0.0
