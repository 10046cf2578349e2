"""patch(compile=...): compiled blocks compute what eager ones do, and compile once per shape kind.

Named to run after test_fit.py: once torch.compile has run in the test process, fork-based DDP
children of a later training test fail to backpropagate (autograd's threads and fork).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from atm_lightning import merge_stats, patch, unpatch
from tests.helpers import ATM_LENIENT, blocky_images, make_vit

ATM_SETTINGS = {**ATM_LENIENT, "split_layer": 3}  # 4 blocks: the size-sorted split in the last two


@pytest.fixture
def small_model():
    torch._dynamo.reset()
    counters.clear()
    yield make_vit("vit_tiny_patch16_224", depth=4, embed_dim=64, num_heads=2)
    torch._dynamo.reset()


def _run(model, images, **options):
    patch(model, **options)
    with torch.inference_mode():
        out = model(images)
    return out, merge_stats(model).tokens


@pytest.mark.parametrize(("ragged", "batch"), [("packed", 4), ("padded", 4), ("packed", 1)])
def test_compiled_equals_eager(small_model, ragged, batch):
    """Same logits and the same tokens per block, for ragged ATM batches and single images."""
    images = blocky_images(batch, seed=3)
    settings = {"method": "atm", "ragged": ragged, **ATM_SETTINGS}
    eager, eager_tokens = _run(small_model, images, **settings)
    compiled, tokens = _run(small_model, images, compile="aot_eager", **settings)
    assert torch.equal(tokens, eager_tokens)
    assert len(set(tokens[:, -1].tolist())) > 1 or batch == 1  # ragged: the packed path ran
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_no_recompilation_after_warm_up(small_model):
    """New images and another batch size reuse the graphs the first batches compiled."""
    patch(small_model, "atm", compile="aot_eager", **ATM_SETTINGS)
    with torch.inference_mode():
        for seed in (0, 1):  # warm-up: every shape kind of these batch sizes
            small_model(blocky_images(4, seed=seed))
            small_model(blocky_images(1, seed=seed))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        for seed in range(2, 6):
            small_model(blocky_images(3 + seed % 3, seed=seed))
            small_model(blocky_images(1, seed=seed))
    assert counters["stats"]["unique_graphs"] == graphs


def test_repatching_switches_between_compiled_and_eager(small_model):
    images = blocky_images(2)
    patch(small_model, "tome", r=8, compile="aot_eager")
    assert small_model._merging.blocks.backend == "aot_eager"
    patch(small_model, "tome", r=8)
    assert not hasattr(small_model._merging.blocks, "backend")
    with torch.inference_mode():
        small_model(images)
    assert merge_stats(small_model).tokens[0].tolist() == [197 - 8 * i for i in range(5)]
    unpatch(small_model)
