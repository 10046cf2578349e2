"""Uncertain images run again unmerged (``rerun_margin``), and both passes are paid for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.merge import ATM, EViT, ToMe
from atm_lightning.patch.rerun import top2_gap
from tests.helpers import blocky_images, make_vit

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
    torch.testing.assert_close(stats.gflops, merged_gflops + rerun.double() * stats.gflops_dense, rtol=1e-12, atol=0)
    assert torch.equal(stats.tokens, merge_stats(model).tokens)


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
