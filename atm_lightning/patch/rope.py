"""timm's rotary position embeddings evaluated at any (continuous) token position.

A merged token sits at the size-weighted mean grid position of the patches it holds
(docs/method.md, "Positions of merged tokens"). timm builds its RoPE tables from an integer grid;
the angles are linear in the grid coordinates, so the same formulas, written here with timm's
own operations in timm's order, give the rotation at a continuous position, and exactly timm's
table at integer positions (tests/test_eva.py holds that, bit for bit). Two kinds are supported:
``RotaryEmbeddingCat`` on an index grid (EVA-02, timm's RoPE ViTs) and ``RotaryEmbeddingDinoV3``.
"""

from __future__ import annotations

import math

import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3
from torch import Tensor, nn


def rope_problem(rope: nn.Module | None) -> str | None:
    """Why ``rope`` cannot be evaluated at merged positions, or None when it can."""
    if rope is None or isinstance(rope, RotaryEmbeddingDinoV3):
        return None
    if isinstance(rope, RotaryEmbeddingCat):
        if rope.grid_type != "index":
            return f"RotaryEmbeddingCat on a {rope.grid_type!r} grid (only 'index' grids are supported)"
        return None
    return f"{type(rope).__name__} (supported: RotaryEmbeddingCat, RotaryEmbeddingDinoV3)"


def rope_at(rope: nn.Module, positions: Tensor, grid: tuple[int, int]) -> Tensor:
    """The rotary embedding [..., 2*dim] (sin then cos, timm's layout) at ``positions`` [..., 2]
    ((row, col) in patches, float32) of a ``grid`` = (rows, cols) patch grid."""
    if isinstance(rope, RotaryEmbeddingDinoV3):
        return _dinov3_at(rope, positions, grid)
    return _cat_at(rope, positions, grid)


def _axes(positions: Tensor, grid: tuple[int, int], indexing: str) -> tuple[list[Tensor], list[int]]:
    """The coordinate channels and their grid sizes in timm's channel order ('ij': rows first)."""
    axes, sizes = [positions[..., 0], positions[..., 1]], list(grid)
    if indexing == "xy":
        return axes[::-1], sizes[::-1]
    return axes, sizes


def _layout(values: Tensor, rotate_half: bool) -> Tensor:
    """Per-frequency values [..., F] in timm's rotation layout [..., 2F] (half or interleaved)."""
    return torch.cat([values, values], dim=-1) if rotate_half else values.repeat_interleave(2, -1)


def _cat_at(rope: RotaryEmbeddingCat, positions: Tensor, grid: tuple[int, int]) -> Tensor:
    """``build_fourier_pos_embed`` on an index grid: t = c + offset (rescaled to ``ref_feat_shape``),
    angles t * bands."""
    axes, sizes = _axes(positions, grid, rope.grid_indexing)
    refs = None
    if rope.ref_feat_shape is not None:
        refs = list(rope.ref_feat_shape)[::-1] if rope.grid_indexing == "xy" else list(rope.ref_feat_shape)
    coords = []
    for i, axis in enumerate(axes):
        t = axis + rope.grid_offset
        if refs is not None:
            t = t / sizes[i] * refs[i]
        coords.append(t)
    angles = torch.stack(coords, dim=-1).unsqueeze(-1) * rope.bands  # [..., 2, F]
    sin, cos = angles.sin().float(), angles.cos().float()
    return torch.cat([_layout(sin.flatten(-2), rope.rotate_half), _layout(cos.flatten(-2), rope.rotate_half)], -1)


def _dinov3_at(rope: RotaryEmbeddingDinoV3, positions: Tensor, grid: tuple[int, int]) -> Tensor:
    """DINOv3's centred coordinates, 2 * ((c + 0.5 + offset) / size) - 1, at angles 2 pi t / period."""
    axes, sizes = _axes(positions, grid, rope.grid_indexing)
    if rope.normalize_coords == "max":
        denom = [float(max(sizes))] * 2
    elif rope.normalize_coords == "min":
        denom = [float(min(sizes))] * 2
    else:
        denom = [float(s) for s in sizes]
    coords = torch.stack([((axis + 0.5) + rope.grid_offset) / d for axis, d in zip(axes, denom, strict=True)], -1)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[..., None] / rope.periods).flatten(-2)  # [..., 2F]
    return torch.cat([_layout(angles.sin(), rope.rotate_half), _layout(angles.cos(), rope.rotate_half)], -1)


def grid_coords(batch: int, grid: tuple[int, int], prefix: int, device: torch.device) -> Tensor:
    """[B, prefix + rows*cols, 2] float32: each patch token's (row, col), row-major as timm flattens
    the grid; prefix tokens (never rotated) get 0."""
    rows, cols = grid
    row, col = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float32),
        torch.arange(cols, device=device, dtype=torch.float32),
        indexing="ij",
    )
    coords = torch.cat([torch.zeros(prefix, 2, device=device), torch.stack([row, col], -1).view(-1, 2)])
    return coords.expand(batch, -1, -1)


def rotate(t: Tensor, rope: Tensor, rotate_half: bool) -> Tensor:
    """``t`` [..., N, d] rotated by ``rope`` [..., N, 2d], as timm's ``apply_rot_embed_cat``."""
    sin, cos = rope.chunk(2, -1)
    if rotate_half:
        x1, x2 = t.chunk(2, dim=-1)
        turned = torch.cat([-x2, x1], dim=-1)
    else:
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    return (t * cos + turned * sin).to(t.dtype)
