"""Pooling merged tokens and images of any size (docs/method.md, "Model families"): attention
pooling counts a merged token as the patches it holds; token counts and FLOPs follow the real
patch grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.flops import ViTCost
from atm_lightning.patch.pooling import pool_merged
from tests.helpers import blocky_images, counted_macs, make_vit

SIZES = torch.tensor([[1.0, 2.0, 3.0, 1.0, 0.0, 0.0], [2.0, 2.0, 1.0, 1.0, 1.0, 4.0]])  # 0: padding


@pytest.mark.parametrize("family", ["vit_base_patch16_siglip_224", "eva02_tiny_patch14_224"])
@torch.no_grad()
def test_attention_pooling_of_merged_tokens_equals_pooling_their_copies(family):
    """A token of size s, pooled with its sizes, is pooled as s copies of it would be by the dense
    head (timm's own AttentionPoolLatent on the copies, no mask); padding is ignored."""
    model = make_vit(family, depth=1, embed_dim=192, num_heads=3, global_pool="map")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 192, generator=g)
    pooled = pool_merged(model, x, "map", SIZES, start=0)
    for i in range(2):
        copies = x[i].repeat_interleave(SIZES[i].long(), dim=0)[None]
        torch.testing.assert_close(pooled[i], model.attn_pool(copies)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], model.attn_pool(x[:1, :4])[0], atol=1e-3)  # sizes matter


@torch.no_grad()
def test_average_pooling_of_merged_tokens_equals_pooling_their_copies():
    model = make_vit("vit_tiny_patch16_224", depth=1, global_pool="avg", class_token=False)
    x = torch.randn(2, 6, 192)
    pooled = pool_merged(model, x, "avg", SIZES, start=0)
    for i in range(2):
        torch.testing.assert_close(pooled[i], x[i].repeat_interleave(SIZES[i].long(), dim=0).mean(0))


MODELS = {
    "vit_dynamic": lambda: make_vit("vit_tiny_patch16_224", depth=4, dynamic_img_size=True),
    "dinov3": lambda: make_vit("vit_small_patch16_dinov3", depth=4, embed_dim=192, num_heads=3, head_init_scale=1.0),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("height", "width"), [(224, 224), (160, 128)])
@torch.no_grad()
def test_dynamic_image_size_counts_the_real_grid(name, height, width):
    """At two resolutions: unmerged logits are timm's, ToMe starts from the image's own patch
    count, and the FLOPs (dense, and merged plus matching) are what torch's counter counts."""
    model = MODELS[name]()
    image = blocky_images(1, size=224)[..., :height, :width]
    reference = model(image)
    patch(model, "none")
    assert torch.equal(model(image), reference)
    tokens = (height // 16) * (width // 16) + model.num_prefix_tokens
    assert counted_macs(model, image) == round(merge_stats(model).gflops_dense * 1e9)
    patch(model, "tome", r=8)
    counted = counted_macs(model, image)
    stats = merge_stats(model)
    assert stats.tokens[0].tolist() == [tokens - 8 * i for i in range(5)]
    assert counted == round(stats.gflops[0].item() * 1e9)


@torch.no_grad()
def test_a_384_pixel_model_counts_its_577_tokens():
    model = make_vit("deit_base_patch16_384", depth=2)
    full_depth = dataclasses.replace(ViTCost.from_model(model), depth=12)
    assert full_depth.dense_macs(577) / 1e9 == pytest.approx(55.5, rel=0.01)  # DeiT-B/16 at 384 px, as published
    image = torch.randn(1, 3, 384, 384)
    patch(model, "tome", r=32)
    counted = counted_macs(model, image)
    stats = merge_stats(model)
    assert stats.tokens[0].tolist() == [577, 545, 513]
    assert counted == round(stats.gflops[0].item() * 1e9)
