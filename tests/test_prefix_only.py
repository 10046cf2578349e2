"""``last_block_prefix_only``: the last block computes the prefix tokens alone, same logits, fewer FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.merge import ATM, NoMerge, ToMe
from atm_lightning.patch import UnsupportedModelError
from tests.helpers import ATM_LENIENT, blocky_images, counted_macs, make_vit

MERGERS = [NoMerge(), ToMe(r=8), ATM(**ATM_LENIENT | {"split_layer": 4, "beta": 0.002})]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),  # two prefix tokens, two heads
        ("vit_small_patch16_224", {"reg_tokens": 4, "no_embed_class": True, "depth": 4}),
    ],
)
@pytest.mark.parametrize("fused", [False, "auto"])
def test_same_logits_as_the_whole_last_block(name, kwargs, fused) -> None:
    model = make_vit(name, depth=kwargs.pop("depth", 6), img_size=96, **kwargs)
    images = blocky_images(4, seed=1, size=96)
    for merger in MERGERS:
        patch(model, merger, fused=fused)
        with torch.inference_mode():
            whole = model(images)
            tokens = merge_stats(model).tokens
        patch(model, dataclasses.replace(merger, last_block_prefix_only=True), fused=fused)
        with torch.inference_mode():
            prefix = model(images)
        stats = merge_stats(model)
        torch.testing.assert_close(prefix, whole, atol=2e-5, rtol=1e-5)
        assert torch.equal(stats.tokens[:, :-1], tokens[:, :-1])  # the same merges up to the last block
        assert (stats.tokens[:, -1] == model.num_prefix_tokens).all()


@pytest.mark.parametrize("merger", MERGERS)
@torch.no_grad()
def test_flops_equal_the_counter(merger) -> None:
    model = make_vit("vit_tiny_patch16_224", depth=6)
    patch(model, dataclasses.replace(merger, last_block_prefix_only=True), fused=False)  # the counter sees torch ops
    image = blocky_images(2)[1:]
    counted = counted_macs(model, image)
    stats = merge_stats(model)
    assert counted == round(stats.gflops[0].item() * 1e9)
    assert stats.gflops[0] < stats.gflops_dense


def test_training_runs_the_whole_block() -> None:
    model = make_vit("vit_tiny_patch16_224", depth=2)
    patch(model, ToMe(r=4, last_block_prefix_only=True))
    model.train()
    features = model.forward_features(blocky_images(2))
    assert features.shape[1] == 197 - 2 * 4


@pytest.mark.parametrize(
    ("name", "kwargs", "why"),
    [
        ("vit_tiny_patch16_224", {"global_pool": "avg"}, "global_pool='token'"),
        ("eva02_tiny_patch14_224", {}, "timm VisionTransformer"),
    ],
)
def test_a_head_that_reads_every_token_is_refused(name, kwargs, why) -> None:
    model = timm.create_model(name, pretrained=False, depth=2, **kwargs)
    with pytest.raises(UnsupportedModelError, match=rf"last_block_prefix_only needs .*{why}"):
        patch(model, "tome", r=2, last_block_prefix_only=True)


def test_a_rerun_pays_the_dense_blocks_it_runs_with_the_same_last_block() -> None:
    model = make_vit("vit_tiny_patch16_224", depth=4, img_size=96)
    images = blocky_images(3, size=96)
    patch(model, NoMerge(last_block_prefix_only=True))
    with torch.inference_mode():
        dense = model(images)
    dense_gflops = merge_stats(model).gflops
    patch(model, ToMe(r=4, last_block_prefix_only=True))
    with torch.inference_mode():
        model(images)
    merged_gflops = merge_stats(model).gflops
    patch(model, ToMe(r=4, last_block_prefix_only=True, rerun_margin=1.0))  # every image runs again
    with torch.inference_mode():
        rerun = model(images)
    stats = merge_stats(model)
    assert bool(stats.rerun.all()) and torch.equal(rerun, dense)
    torch.testing.assert_close(stats.gflops, merged_gflops + stats.gflops_rerun, rtol=1e-12, atol=0)
    n = 37  # it resumed after block 0's attention, where ToMe first merged
    skipped = (n - 1) * 3 * 16 * 16 * 192 + n * 192 * 4 * 192 + 2 * n * n * 192  # patch embedding, that attention
    assert stats.gflops_rerun == pytest.approx(float(dense_gflops[0]) - skipped / 1e9, rel=1e-12)  # what calibration adds
