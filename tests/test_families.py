"""The model families beyond the classic ViT (docs/method.md, "Model families"): EVA-02 (SwiGLU,
RoPE), timm's RoPE ViTs (LayerScale, registers, average pooling; AttentionRope), DINOv3 (class
token + registers, DINOv3 RoPE, dynamic image size) and SigLIP (attention pooling). Random
weights, 4 blocks; each family must hold the same facts as DeiT (tests/test_patch.py)."""

from __future__ import annotations

import pytest
import torch

from atm_lightning import merge_stats, patch, unpatch
from tests.helpers import ATM_LENIENT, blocky_images, counted_macs, make_vit

SMALL = {"depth": 4, "embed_dim": 192, "num_heads": 3}
EVA_SIGNAL = {"head_init_scale": 1.0}  # Eva heads start at 0.001x: logits would barely move
FAMILIES = {
    "eva02": lambda: make_vit("eva02_tiny_patch14_224", depth=4, **EVA_SIGNAL),
    "vit_rope_reg": lambda: make_vit(
        "vit_medium_patch16_rope_reg1_gap_256", img_size=224, init_values=0.1, **SMALL, **EVA_SIGNAL
    ),
    "vit_rope_attention_rope": lambda: make_vit("vit_small_patch16_rope_224", init_values=0.1, **SMALL, **EVA_SIGNAL),
    "dinov3": lambda: make_vit("vit_small_patch16_dinov3", init_values=0.1, **SMALL, **EVA_SIGNAL),
    "siglip": lambda: make_vit("vit_base_patch16_siglip_224", **SMALL),
}
# Images merge different amounts in every family (last-block split: alternate only).
LENIENT = ATM_LENIENT | {"split_layer": 4, "beta": 0.002}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four blocky images with pixel noise. Without noise, models without absolute position
    embeddings (RoPE only) give the patches of a flat region exactly equal keys: their cosine
    similarities tie at 1, and a tie between destinations breaks by float rounding, which differs
    between batch sizes and between packed and padded runs (as in tests/test_patch.py)."""
    return blocky_images(8, seed=4)[1::2]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@torch.no_grad()
def test_no_merging_is_bit_identical(family, images):
    model = FAMILIES[family]()
    reference = model(images)
    patch(model, "atm", alpha=1.5, beta=0.01, theta_min=1.01, split_layer=3)
    assert torch.equal(model(images), reference)
    patch(model, "tome", r=0)
    assert torch.equal(model(images), reference)
    patch(model, "none")
    assert torch.equal(model(images), reference)
    unpatch(model)
    assert torch.equal(model(images), reference)


@torch.no_grad()
def test_atm_and_tome_reduce_tokens(family, images):
    model = FAMILIES[family]()
    reference = model(images)
    prefix = model.num_prefix_tokens
    n = (images.shape[-1] // model.patch_embed.patch_size[0]) ** 2 + prefix  # DINOv3 takes any size
    patch(model, "tome", r=16, trace_source=True)
    logits = model(images)
    stats = merge_stats(model)
    assert stats.tokens[0].tolist() == [n - 16 * i for i in range(5)]
    assert (stats.source.sum(1) == 1).all() and (stats.size[:, :prefix] == 1).all()
    assert torch.isfinite(logits).all() and not torch.equal(logits, reference)
    patch(model, "atm", **LENIENT)
    model(images)
    tokens = merge_stats(model).tokens
    assert (tokens[:, -1] < n).any() and len(set(tokens[:, -1].tolist())) > 1
    assert torch.equal(merge_stats(model).flops_reduction > 0, tokens[:, -1] < n)


@torch.no_grad()
def test_exact_rule_is_batch_independent(family, images):
    model = FAMILIES[family]()
    patch(model, "atm", batch_rule="exact", **LENIENT)
    logits = model(images)
    tokens = merge_stats(model).tokens
    for i in range(len(images)):
        single = model(images[i : i + 1])
        assert torch.equal(merge_stats(model).tokens[0], tokens[i])
        torch.testing.assert_close(single[0], logits[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["tome", "atm"])
@torch.no_grad()
def test_flops_match_the_counter(family, method):
    """Dense, and merged plus matching, the analytic count is what torch's counter counts: SwiGLU,
    separate q/k/v projections, attention pooling included; RoPE is element-wise, not counted."""
    model = FAMILIES[family]()
    image = blocky_images(2, seed=4)[1:]  # one image: nothing padded
    patch(model, "none")
    dense = counted_macs(model, image)
    assert dense == round(merge_stats(model).gflops_dense * 1e9)
    patch(model, method, fused=False, **({"r": 16} if method == "tome" else LENIENT))  # the counter sees torch ops only
    counted = counted_macs(model, image)
    stats = merge_stats(model)
    assert stats.tokens[0, -1] < stats.tokens[0, 0]
    assert counted == round(stats.gflops[0].item() * 1e9)
