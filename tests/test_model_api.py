"""The rest of timm's model API on a patched model: it merges as the forward does, or refuses
with the fix; never a silently different number (atm_lightning/patch/model_api.py)."""

from __future__ import annotations

import pytest
import torch

from atm_lightning import UnsupportedModelError, merge_stats, patch
from atm_lightning.patch import unmerged
from tests.helpers import ATM_LENIENT, blocky_images, counted_macs, make_vit

SMALL = {"depth": 4, "embed_dim": 96, "num_heads": 3, "img_size": 64}


def small_vit(**kwargs) -> torch.nn.Module:
    return make_vit("vit_tiny_patch16_224", **(SMALL | kwargs))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return blocky_images(4, seed=1, size=64)


def test_reset_classifier_updates_the_counted_head(images):
    model = patch(small_vit(), "none")
    model.reset_classifier(10)
    with torch.inference_mode():
        model(images)
    assert merge_stats(model).gflops[0].item() * 1e9 == pytest.approx(counted_macs(model, images[:1]), rel=1e-9)


def test_reset_classifier_to_a_pool_merged_tokens_cannot_use(images):
    model = patch(small_vit(), "tome", r=2)
    model.reset_classifier(10, global_pool="avgmax")
    with pytest.raises(ValueError, match="token, avg or map pooling, got 'avgmax'.*reset_classifier"):
        model(images)


def test_forward_intermediates_refuses_while_merging_and_is_timms_inside_unmerged(images):
    model = patch(small_vit(class_token=False, global_pool="avg"), "tome", r=2)
    with pytest.raises(NotImplementedError, match="unmerged"):
        model.forward_intermediates(images)
    with torch.inference_mode():
        model(images)  # a merged forward leaves its token sizes behind
        with unmerged(model):
            final, _ = model.forward_intermediates(images)
            logits = model.forward_head(final)
    reference = small_vit(class_token=False, global_pool="avg")
    with torch.inference_mode():
        expected = reference.forward_head(reference.forward_intermediates(images)[0])
    assert torch.equal(logits, expected)


def test_head_refuses_features_of_another_forward(images):
    model = patch(small_vit(class_token=False, global_pool="avg"), "tome", r=2)
    with torch.inference_mode():
        model(images)
        with pytest.raises(ValueError, match="call it right after that forward"):
            model.forward_head(torch.zeros(len(images), 16, 96))


def test_training_options_the_block_loop_does_not_carry_out_are_refused(images):
    model = patch(small_vit(), "tome", r=2).train()
    model.set_grad_checkpointing(True)
    with pytest.raises(NotImplementedError, match="set_grad_checkpointing\\(False\\)"):
        model(images)
    model = patch(small_vit(patch_drop_rate=0.5), "tome", r=2).train()
    with pytest.raises(NotImplementedError, match="patch_drop_rate=0"):
        model(images)
    with torch.inference_mode():
        model.eval()(images)  # patch dropout is off at inference


@pytest.mark.parametrize(
    ("name", "kwargs", "why"),
    [
        ("vit_tiny_r_s16_p8_224", {"depth": 2}, "HybridEmbed, not timm's PatchEmbed"),
        ("vit_small_patch16_18x2_224", {"depth": 2}, "block 0 is ParallelThingsBlock with NoneType"),
    ],
)
def test_models_the_adapter_cannot_count_or_run_are_refused(name, kwargs, why):
    with pytest.raises(UnsupportedModelError, match=why):
        patch(make_vit(name, **kwargs), "tome", r=2)


@pytest.mark.parametrize(("method", "setting"), [("tome", "prop_attn"), ("atm", "size_weighted"), ("evit", "fuse_token")])
def test_yes_no_settings_must_be_booleans(method, setting):
    with pytest.raises(ValueError, match=f"{setting} is true or false, got 'false'"):
        patch(small_vit(), method, **{setting: "false"})


def test_merging_atm_still_runs_after_these_checks(images):
    model = patch(small_vit(), "atm", **(ATM_LENIENT | {"split_layer": 4}))
    with torch.inference_mode():
        model(images)
    assert (merge_stats(model).tokens[:, -1] < 17).any()
