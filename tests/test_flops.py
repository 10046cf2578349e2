"""FLOPs (docs/flops.md): analytic FLOPs match the papers' dense numbers and torch's own op counter."""

from __future__ import annotations

import pytest
import timm
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.flops import ViTCost

from tests.helpers import ATM_LENIENT, blocky_images, counted_macs


@pytest.mark.parametrize(
    ("name", "expected"),
    [("deit_tiny_patch16_224", 1.26), ("deit_small_patch16_224", 4.61), ("deit_base_patch16_224", 17.58)],
)
def test_dense_gflops_match_published(name, expected):
    model = timm.create_model(name, pretrained=False)
    gflops = ViTCost.from_model(model).dense_macs(197) / 1e9
    assert gflops == pytest.approx(expected, rel=0.01)


def _block_formula(n: int, n_out: int, dim: int) -> int:
    """docs/flops.md, written out: qkv + QK^T/AV + proj at N tokens, MLP (ratio 4) at N'."""
    return 3 * n * dim**2 + 2 * n**2 * dim + n * dim**2 + 8 * n_out * dim**2


@torch.no_grad()
def test_merged_gflops_sum_the_formula_over_observed_tokens():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    patch(model, "atm", **ATM_LENIENT)
    model(blocky_images(3))
    stats = merge_stats(model)
    assert stats.gflops_dense == pytest.approx(1_253_683_200 / 1e9)
    for i in range(3):
        t = stats.tokens[i].tolist()
        macs = sum(_block_formula(t[b], t[b + 1], 192) for b in range(12)) + 196 * 768 * 192 + 192 * 1000
        assert stats.gflops[i].item() == pytest.approx(macs / 1e9, rel=1e-6)
    assert (stats.flops_reduction > 0.2).all()


@torch.no_grad()
def test_dense_formula_equals_flop_counter():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    assert counted_macs(model, torch.randn(1, 3, 224, 224)) == 1_253_683_200


@pytest.mark.parametrize("method", ["tome", "atm"])
@torch.no_grad()
def test_merged_formula_plus_matching_equals_flop_counter(method):
    """With one image (nothing padded) executed work is the analytic count plus the matching."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    settings = {"r": 13} if method == "tome" else ATM_LENIENT
    patch(model, method, **settings)
    image = blocky_images(2)[1:]
    counted = counted_macs(model, image)
    stats = merge_stats(model)
    assert stats.tokens[0, -1] < 100
    analytic = round((stats.gflops[0].double().item() + stats.gflops_matching[0].double().item()) * 1e9)
    assert counted == analytic


@torch.no_grad()
def test_evit_flops_follow_the_same_counter():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    patch(model, "evit", keep_rate=0.7)
    counted = counted_macs(model, blocky_images(1))
    stats = merge_stats(model)
    analytic = round((stats.gflops[0].item() + stats.gflops_matching[0].item()) * 1e9)
    assert counted == analytic
