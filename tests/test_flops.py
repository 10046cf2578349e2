"""FLOPs (docs/flops.md): analytic FLOPs match the papers' dense numbers and torch's own op counter."""

from __future__ import annotations

import pytest
import timm
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.flops import ViTCost
from atm_lightning.merge import ATM, EViT, ToMe

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


@pytest.mark.parametrize("method", ["tome", "atm", "evit"])
@torch.no_grad()
def test_merged_formula_equals_flop_counter(method):
    """With one image (nothing padded) the model's executed work is the analytic count."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    settings = {"r": 13} if method == "tome" else ATM_LENIENT if method == "atm" else {"keep_rate": 0.7}
    patch(model, method, fused=False, **settings)  # the compiled kernel's work is invisible to the counter
    image = blocky_images(2)[1:]
    counted = counted_macs(model, image)
    stats = merge_stats(model)
    assert stats.tokens[0, -1] < 100 if method != "evit" else stats.tokens[0, -1] < 197
    assert counted == round(stats.gflops[0].double().item() * 1e9)


def _step_macs(cost: ViTCost, policy, tokens: list[int], protected: int, channels: int) -> int:
    """What one image's merge steps compute in batched products (docs/flops.md, "The merge step"):
    similarities of the rows and columns the step forms, the class token's attention where read,
    and the move of the tokens (with their lengths when they keep their norm)."""
    total = 0
    for layer in range(len(tokens) - 1):
        if not policy.merges_in(layer):
            continue
        n, n_out = tokens[layer], tokens[layer + 1]
        m = n - protected
        if isinstance(policy, (ATM, ToMe)):
            width = cost.attn_width if policy.key_form == "per_head" else cost.head_dim
            first = protected + protected % 2
            rows, cols = ((m + 1) // 2, m) if policy.split_kind(layer) == "size" else ((n - first + 1) // 2, m - (n - first + 1) // 2)
            total += rows * cols * width
            total += n * cost.attn_width if policy.needs_class_attention else 0
            total += n_out * n * (channels + (1 if policy.keeps_norm else 0))
        else:
            total += n * cost.attn_width + n_out * n * channels
    return total


@pytest.mark.parametrize(
    "policy",
    [ToMe(r=13), ATM(**ATM_LENIENT, keys="per_head", size_weighted=True, attention_power=0.5, keep_norm=True),
     EViT(keep_rate=0.7)],
)
@torch.no_grad()
def test_the_merge_steps_compute_what_their_formula_says(policy):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    patch(model, policy, fused=False)
    image = blocky_images(2)[1:]
    counted = counted_macs(model, image, merge_step=True)
    stats = merge_stats(model)
    cost = ViTCost.from_model(model)
    assert counted == _step_macs(cost, policy, stats.tokens[0].tolist(), 1, 192)
    assert counted >= round(stats.gflops_matching[0].item() * 1e9)  # the papers' matching cost is part of it
