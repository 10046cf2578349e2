"""The batched merge step's operations per forward: each is a kernel launch on a GPU, so their number
must not grow with the batch, and the host may wait for the device at most once per merging block."""

from __future__ import annotations

import dataclasses

import pytest

from atm_lightning import merge_stats, patch, unpatch
from atm_lightning.merge import ATM, EViT, ToMe, from_config_file
from atm_lightning.evaluation.launches import count_ops, launches_per_forward
from tests.helpers import ATM_LENIENT, CONFIGS, blocky_images, make_vit

ATM_SETTINGS = {**ATM_LENIENT, "split_layer": 5}
REFINED = {"keys": "per_head", "size_weighted": True, "attention_power": 0.5, "keep_norm": True}


@pytest.mark.parametrize(
    "policy",
    [ToMe(r=8), EViT(keep_rate=0.7, prune_layers=[2, 4]), ATM(**ATM_SETTINGS), ATM(**ATM_SETTINGS, **REFINED, rerun_margin=0.5)],
    ids=["tome", "evit", "atm", "atm-refined-rerun"],
)
def test_operations_do_not_grow_with_the_batch(policy):
    model = make_vit("deit_tiny_patch16_224", depth=6, img_size=96)
    images = blocky_images(16, seed=2, size=96)
    patch(model, policy, fused=False)
    small, large = count_ops(model, images[:4]), count_ops(model, images)
    assert len(set(merge_stats(model).tokens[:, -1].tolist())) > 1 or not isinstance(policy, ATM)  # ragged
    if not policy.rerun_margin:  # a rerun's operations depend on where the batch first merged
        assert small.ops == large.ops
    merging_blocks = sum(policy.merges_in(layer) for layer in range(6))
    if isinstance(policy, ATM):  # the new width of each merging block, and which images rerun
        assert large.host_reads <= merging_blocks + (1 if policy.rerun_margin else 0)
    else:  # every image merges the same count: the host knows the widths
        assert large.host_reads == 0


@pytest.mark.shared
def test_the_shipped_points_launch_a_few_times_what_the_dense_model_does(shared_weights, shared_images):
    """ViT-Ti on real images: ToMe r=9 at most 4x and the shipped ATM point (reruns included) at
    most 6x the dense model's operations, the same count at batch 8 and 64, one host read per
    merging block and one for the rerun."""
    from atm_lightning.data.images import evenly_spaced, image_paths, load_images
    from atm_lightning.models import create_model

    images, _ = load_images(evenly_spaced(image_paths([shared_images]), 64), "vit_tiny_patch16_224")
    model = create_model("vit_tiny_patch16_224", weights=str(shared_weights)).eval()
    dense = count_ops(unpatch(model), images[:8]).total
    shipped = from_config_file(CONFIGS / "vit_t_atm.yaml")
    for policy, most in ((ToMe(r=9), 4.0), (shipped, 6.0)):
        patch(model, policy, fused=False)
        counts = {batch: count_ops(model, images[:batch]) for batch in (8, 64)}
        assert counts[64].total <= most * dense, (policy.name, counts[64].total, dense)
        merging_blocks = sum(policy.merges_in(layer) for layer in range(11))  # the last block computes the class token
        assert counts[64].host_reads <= (merging_blocks + 1 if policy is shipped else 0)
        patch(model, dataclasses.replace(policy, rerun_margin=0.0), fused=False)  # the merged pass alone
        assert count_ops(model, images[:8]).ops == count_ops(model, images).ops, policy.name
    patch(model, shipped, fused=False)
    model(images)
    assert bool(merge_stats(model).rerun.any())  # the counts at batch 64 included a rerun


@pytest.mark.slow
@pytest.mark.shared
def test_batch_256_launches_what_batch_8_does(shared_weights, shared_images):
    from atm_lightning.data.images import evenly_spaced, image_paths, load_images
    from atm_lightning.models import create_model

    images, _ = load_images(evenly_spaced(image_paths([shared_images]), 256), "vit_tiny_patch16_224")
    model = create_model("vit_tiny_patch16_224", weights=str(shared_weights)).eval()
    every_image_reruns = dataclasses.replace(from_config_file(CONFIGS / "vit_t_atm.yaml"), rerun_margin=1.0)
    for policy in (ToMe(r=9), every_image_reruns):  # so that both batches count a rerun
        patch(model, policy, fused=False)
        small, large = count_ops(model, images[:8]).total, count_ops(model, images).total
        assert abs(large - small) <= 0.05 * small, (policy.name, small, large)


def test_on_a_cpu_launches_are_the_aten_operations():
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64)
    images = blocky_images(2, size=64)
    assert launches_per_forward(model, images) == count_ops(model, images).total > 10
