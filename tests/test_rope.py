"""Positions of merged tokens in RoPE models (docs/method.md, "Positions of merged tokens"): a
merged token sits at the size-weighted mean grid position of its patches, rotated by timm's
rotary embedding evaluated there."""

from __future__ import annotations

import pytest
import timm
import torch

from atm_lightning import UnsupportedModelError, merge_stats, patch
from atm_lightning.patch import eva
from atm_lightning.patch.attention import attention_bias
from atm_lightning.patch.loop import KeyNeeds
from atm_lightning.patch.rope import grid_coords, rope_at
from atm_lightning.merge import TokenState
from tests.helpers import ATM_LENIENT, blocky_images, make_vit

ROPES = {
    "eva02 (cat, ref_feat_shape)": lambda: make_vit("eva02_tiny_patch14_224", depth=1),
    "rope ViT (cat, xy indexing)": lambda: make_vit("vit_small_patch16_rope_224", depth=1),
    "cat with grid offset": lambda: make_vit("eva02_tiny_patch14_224", depth=1, rope_grid_offset=0.5),
    "dinov3 (rotate_half)": lambda: make_vit("vit_small_patch16_dinov3", depth=1),
    "dinov3 (min normalisation)": lambda: _dinov3_min(),
}


def _dinov3_min() -> torch.nn.Module:
    model = make_vit("vit_small_patch16_dinov3", depth=1)
    model.rope.normalize_coords = "min"
    return model


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_at_grid_positions_is_timms_table(name):
    """At integer positions the continuous evaluation is timm's own table, bit for bit, on the
    model's grid and, where timm builds tables for any grid, on a non-square one."""
    model = ROPES[name]()
    grids = [tuple(model.patch_embed.grid_size)]
    if model.rope.feat_shape is None or name.startswith("dinov3"):
        grids.append((9, 13))
    for grid in grids:
        table = model.rope.get_embed(shape=grid) if len(grids) > 1 else model.rope.get_embed()
        got = rope_at(model.rope, grid_coords(2, grid, 0, torch.device("cpu")), grid)
        assert torch.equal(got[0], table) and torch.equal(got[1], table)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])
@torch.no_grad()
def test_identical_tokens_at_one_position_merge_losslessly(name):
    """Two copies of a token at one position (sizes 1 and 1) and the one token of size 2 there give
    every token the same block output: proportional attention counts the copy, RoPE rotates both
    alike (interleaved and half layouts)."""
    model = make_vit(name, depth=1, init_values=None, head_init_scale=1.0)
    block, prefix, dim = model.blocks[0], model.num_prefix_tokens, model.embed_dim
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, prefix + 3, dim, generator=g)
    places = torch.tensor([[2.0, 3.0], [5.0, 1.0], [5.0, 1.0]])  # the last two share a position
    tokens[0, -1] = tokens[0, -2]
    coords = torch.cat([torch.zeros(prefix, 2), places])[None]
    dense = _block_output(model, block, tokens, torch.ones(1, prefix + 3), coords)
    merged_coords = coords[:, :-1].clone()  # the mean of the two copies' positions: the same place
    size = torch.ones(1, prefix + 2)
    size[0, -1] = 2
    merged = _block_output(model, block, tokens[:, :-1], size, merged_coords)
    torch.testing.assert_close(merged, dense[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense[:, -1], dense[:, -2], atol=1e-6, rtol=0)


def _block_output(model, block, x, size, positions) -> torch.Tensor:
    runner = eva.EvaBlocks(model)
    runner.begin(None, tuple(model.patch_embed.grid_size))
    prefix = model.num_prefix_tokens
    state = TokenState(x.clone(), torch.tensor([x.shape[1] - prefix]), prefix, size=size, positions=positions)
    bias = attention_bias(size, True, x.dtype)
    out = runner.attention_residual(0, block, state, bias, KeyNeeds(), "sdpa")
    runner.remove_hooks()
    return runner.mlp_residual(block, out.x)


@torch.no_grad()
def test_merged_tokens_are_rotated_at_their_patches_mean_position(monkeypatch):
    """Every rotation evaluated after a merge is at each token's mean patch position, computed
    independently from the traced sources (which patches each token holds)."""
    model = make_vit("eva02_tiny_patch14_224", depth=4)
    seen = []

    def spy(rope, positions, grid):
        seen.append(positions.clone())
        return rope_at(rope, positions, grid)

    monkeypatch.setattr(eva, "rope_at", spy)
    patch(model, "tome", r=24, trace_source=True)
    model(blocky_images(2))
    grid = grid_coords(1, (16, 16), 1, torch.device("cpu"))[0]  # [257, 2]
    expected = [s @ grid / s.sum(-1, keepdim=True) for s in merge_stats(model).sources[:-1]]
    assert len(seen) == 3  # after the merges of blocks 1-3
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not torch.equal(got, got.round())  # merged tokens sit between grid points


def test_unsupported_eva_variants_raise_clear_errors():
    with pytest.raises(UnsupportedModelError, match=r"vit_small_patch16_rope_mixed_224.*RotaryEmbeddingMixed"):
        patch(timm.create_model("vit_small_patch16_rope_mixed_224", depth=1), "atm")
    with pytest.raises(UnsupportedModelError, match=r"EvaBlockPostNorm"):
        patch(timm.create_model("eva02_tiny_patch14_224", depth=1, use_post_norm=True), "atm")
    with pytest.raises(UnsupportedModelError, match=r"global_pool='avgmax'"):
        patch(timm.create_model("eva02_tiny_patch14_224", depth=1, global_pool="avgmax"), "tome", r=2)
    with pytest.raises(UnsupportedModelError, match=r"evit.*eva02_tiny_patch14_224.*RoPE"):
        patch(timm.create_model("eva02_tiny_patch14_224", depth=1), "evit", keep_rate=0.7, prune_layers=[1])
    with pytest.raises(UnsupportedModelError, match=r"ResNet.*only timm VisionTransformer.*timm Eva"):
        patch(timm.create_model("resnet18"), "atm", **ATM_LENIENT)
