"""Uncertain images run again unmerged (``rerun_margin``), and both passes are paid for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.merge import ATM, EViT, ToMe
from atm_lightning.patch.rerun import top2_gap
from tests.helpers import blocky_images, counted_macs, make_vit

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_vit(NAME, img_size=96, depth=4)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return blocky_images(8, seed=3, size=96)


def forward(model: torch.nn.Module, images: torch.Tensor, merger) -> torch.Tensor:
    patch(model, merger)
    with torch.inference_mode():
        return model(images)


@pytest.mark.parametrize("merger", [ToMe(r=6), EViT(keep_rate=0.5, prune_layers=(2,))])
def test_uncertain_images_take_the_dense_output_and_pay_a_dense_pass(model, images, merger) -> None:
    dense = forward(model, images, "none")
    merged = forward(model, images, merger)
    merged_gflops = merge_stats(model).gflops
    gap = top2_gap(merged)
    margin = float(gap.median())
    rerun = gap < margin
    assert 0 < int(rerun.sum()) < len(images)

    mixed = forward(model, images, dataclasses.replace(merger, rerun_margin=margin))
    stats = merge_stats(model)
    assert torch.equal(stats.rerun, rerun)
    assert torch.equal(mixed[~rerun], merged[~rerun])  # the merged pass is the one it was
    torch.testing.assert_close(mixed[rerun], dense[rerun], atol=1e-5, rtol=0)  # a smaller dense batch
    torch.testing.assert_close(stats.gflops, merged_gflops + rerun.double() * stats.gflops_rerun, rtol=1e-12, atol=0)
    assert 0 < stats.gflops_rerun < stats.gflops_dense  # it resumed where the batch first merged
    assert torch.equal(stats.tokens, merge_stats(model).tokens)


ATM_FROM_BLOCK_2 = ATM(alpha=1.0, beta=0.02, theta_min=0.9, split_layer=3)  # block 1 strict: alpha 1


@pytest.mark.parametrize(
    ("merger", "layer"),
    [
        (ToMe(r=6), 0),
        (EViT(keep_rate=0.5, prune_layers=(2,)), 1),
        (ToMe(r=6, last_block_prefix_only=True), 0),
        (ATM_FROM_BLOCK_2, 1),  # ragged batches after the first merge
    ],
)
def test_the_rerun_resumes_where_the_batch_first_merged_and_is_priced_as_torch_counts_it(model, images, merger, layer) -> None:
    dense = forward(model, images, "none")
    patch(model, merger, fused=False)  # the counter sees torch ops only
    with torch.inference_mode():
        merged_macs = counted_macs(model, images)
    tokens = merge_stats(model).tokens
    assert int((tokens[:, 1:] < tokens[:, :-1]).any(0).nonzero()[0]) == layer  # the block that first merged
    patch(model, dataclasses.replace(merger, rerun_margin=1.0), fused=False)  # every image runs again
    with torch.inference_mode():
        both_macs = counted_macs(model, images)
        rerun = model(images)
    stats = merge_stats(model)
    assert bool(stats.rerun.all()) and model._merging.last.resume_layer == layer
    torch.testing.assert_close(rerun, dense, atol=1e-5, rtol=0)
    assert model._merging.resume is None and model._merging.start is None  # nothing kept after the forward
    assert (both_macs - merged_macs) / len(images) == pytest.approx(stats.gflops_rerun * 1e9, rel=1e-9)
    n = model.patch_embed.num_patches + 1
    patch(model, "none")
    with torch.inference_mode():
        dense_macs = counted_macs(model, images[:1])
    assert n == merge_stats(model).tokens[0, 0]
    skipped = dense_macs - stats.gflops_rerun * 1e9  # the patch embedding, blocks before, and that block's attention
    if not merger.last_block_prefix_only:
        block = n * 192 * (3 * 192 + 192 + 2 * 768) + 2 * n * n * 192
        attention = n * 192 * 4 * 192 + 2 * n * n * 192
        assert skipped == pytest.approx((n - 1) * 3 * 16 * 16 * 192 + layer * block + attention, rel=1e-9)


def test_a_batch_where_nothing_merged_has_its_dense_output_and_runs_nothing_again(model, images) -> None:
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))  # noise: no near-identical keys
    dense = forward(model, images, "none")
    strict = ATM(alpha=0.99999, beta=0.0, theta_min=0.99999, split_layer=5, rerun_margin=1.0)  # merges nothing here
    out = forward(model, images, strict)
    stats = merge_stats(model)
    assert model._merging.last.resume_layer is None and not bool(stats.rerun.any()) and stats.gflops_rerun == 0.0
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


def test_no_margin_no_rerun_and_no_record(model, images) -> None:
    forward(model, images, ToMe(r=6))
    assert merge_stats(model).rerun is None


def test_training_never_reruns(model, images) -> None:
    merger = ToMe(r=6, rerun_margin=1.0)  # every image would rerun at inference
    patch(model, merger)
    model.train()
    try:
        with torch.no_grad():
            trained = model(images)
    finally:
        model.eval()
    assert merge_stats(model).rerun is None
    assert torch.equal(trained, forward(model, images, ToMe(r=6)))
    forward(model, images, merger)
    assert bool(merge_stats(model).rerun.all())


def test_margin_must_be_a_probability_gap() -> None:
    with pytest.raises(ValueError, match=r"rerun_margin is a softmax-probability gap in \[0, 1\]"):
        ATM(rerun_margin=1.5)
    with pytest.raises(ValueError, match="rerun_margin"):
        ToMe(r=2, rerun_margin=-0.1)


def test_a_model_without_classes_cannot_rerun() -> None:
    features = make_vit(NAME, img_size=96, depth=2, num_classes=0)
    with pytest.raises(ValueError, match="has 0 classes; set rerun_margin 0"):
        patch(features, "tome", r=2, rerun_margin=0.1)


def test_top2_gap() -> None:
    logits = torch.tensor([[0.0, 0.0, -1e9], [10.0, 0.0, 0.0]])
    gap = top2_gap(logits)
    assert gap[0] == 0.0 and gap[1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])
def test_a_rope_model_resumes_with_its_token_positions(name) -> None:
    rope_model = make_vit(name, depth=3, img_size=112, num_classes=10)
    images = blocky_images(4, seed=1, size=112)
    dense = forward(rope_model, images, "none")
    out = forward(rope_model, images, ToMe(r=8, rerun_margin=1.0))  # every image runs again
    stats = merge_stats(rope_model)
    assert bool(stats.rerun.all()) and rope_model._merging.last.resume_layer == 0
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)
    assert stats.gflops_rerun < stats.gflops_dense
