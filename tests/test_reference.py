"""The engine against tests/reference_merging.py, an image-by-image reading of the method, on real
images: the same token counts in every block and the same logits to float rounding, for every
image none of whose decisions lay within NEAR of a boundary (those are counted, and few)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atm_lightning import merge_stats, patch, unpatch
from atm_lightning.data.images import evenly_spaced, image_paths, load_images
from atm_lightning.merge import ATM, EViT, ToMe, from_config_file
from atm_lightning.models import create_model
from tests.helpers import CONFIGS
from tests.reference_merging import reference_forward

pytestmark = pytest.mark.shared
NAME = "vit_tiny_patch16_224"


def _shipped(name: str) -> ATM:
    return dataclasses.replace(from_config_file(CONFIGS / f"{name}.yaml"), rerun_margin=0.0)


def _compare(model, images, policy, fused, batch: int = 64) -> tuple[int, int]:
    """Images whose counts differ from the reference though no decision was near (must be none),
    and images with a near decision."""
    unpatch(model)
    reference = reference_forward(model, images, policy)
    patch(model, policy, fused=fused)
    logits, tokens = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            logits.append(model(images[start : start + batch]))
            tokens.append(merge_stats(model).tokens)
    logits, tokens = torch.cat(logits), torch.cat(tokens)
    prefix = 1 if policy.last_block_prefix_only else 0  # that block's count is the class token alone
    same = (tokens[:, : tokens.shape[1] - prefix] == reference.counts[:, : tokens.shape[1] - prefix]).all(1)
    torch.testing.assert_close(logits[same], reference.logits[same], atol=1e-4, rtol=1e-4)
    return int((~same & ~reference.near).sum()), int(reference.near.sum())


@pytest.fixture(scope="module")
def model(shared_weights):
    return create_model(NAME, weights=str(shared_weights)).eval()


@pytest.mark.parametrize("fused", [False, "auto"], ids=["batched", "kernel"])
@pytest.mark.parametrize("policy", [_shipped("vit_t_atm"), ToMe(r=9), EViT(keep_rate=0.7)], ids=["atm", "tome", "evit"])
def test_the_engine_merges_as_the_reference_on_real_images(model, shared_images, policy, fused):
    if fused and not isinstance(policy, ATM):
        pytest.skip("the kernel runs ATM only")
    images, _ = load_images(evenly_spaced(image_paths([shared_images]), 32), NAME)
    unexplained, near = _compare(model, images, policy, fused)
    assert unexplained == 0 and near <= 4


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, "auto"], ids=["batched", "kernel"])
@pytest.mark.parametrize(
    "policy",
    [_shipped("vit_t_atm_20"), _shipped("vit_t_atm"), _shipped("vit_t_atm_40"),
     ATM(alpha=1.0, beta=0.018, theta_min=0.8, split_layer=12), ToMe(r=13), EViT(keep_rate=0.7)],
    ids=["atm20", "atm30", "atm40", "atm-paper", "tome13", "evit"],
)  # fmt: skip
def test_on_all_sample_images(model, shared_images, policy, fused):
    if fused and not isinstance(policy, ATM):
        pytest.skip("the kernel runs ATM only")
    images, _ = load_images(image_paths([shared_images]), NAME)
    unexplained, near = _compare(model, images, policy, fused)
    assert unexplained == 0 and near <= 0.12 * len(images)
