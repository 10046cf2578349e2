"""patch(compile=...): compiled blocks, merge step included, compute what eager ones do, break their
graph once per merging block, and compile once per shape kind.

Named to run after test_fit.py: once torch.compile has run in the test process, fork-based DDP
children of a later training test fail to backpropagate (autograd's threads and fork).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from atm_lightning import ATM, merge_stats, patch, unpatch
from atm_lightning.patch.compiled import compiled_block
from atm_lightning.patch.loop import run_block
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


@pytest.mark.parametrize("batch", [4, 1])
def test_compiled_equals_eager_with_one_graph_break_per_merging_block(small_model, batch):
    """Same logits and the same tokens per block, for ragged ATM batches and single images; the
    compiled block breaks its graph only where the host reads the merged batch's width."""
    images = blocky_images(batch, seed=3)
    settings = {"method": "atm", "fused": False, **ATM_SETTINGS}
    eager, eager_tokens = _run(small_model, images, **settings)
    compiled, tokens = _run(small_model, images, compile="aot_eager", **settings)
    assert torch.equal(tokens, eager_tokens)
    assert len(set(tokens[:, -1].tolist())) > 1 or batch == 1  # ragged
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    merging_blocks = sum(ATM(**ATM_SETTINGS).merges_in(layer) for layer in range(4))
    assert 0 < sum(counters["graph_break"].values()) <= merging_blocks


def test_no_recompilation_after_warm_up(small_model):
    """New images and another batch size reuse the graphs the first batches compiled."""
    patch(small_model, "atm", compile="aot_eager", fused=False, **ATM_SETTINGS)
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
    assert small_model._merging.run_block is compiled_block("aot_eager")
    patch(small_model, "tome", r=8)
    assert small_model._merging.run_block is run_block
    with torch.inference_mode():
        small_model(images)
    assert merge_stats(small_model).tokens[0].tolist() == [197 - 8 * i for i in range(5)]
    unpatch(small_model)
