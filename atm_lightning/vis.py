"""Pictures of merged token groups, from source tracking (``trace_source=True``).

Each group of patches that became one token is painted with the mean colour of its patches and
outlined, like ToMe's visualisation and the ATM paper's Figure 1: simple images collapse into few
large groups, cluttered ones keep many small ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


def paint_merged_groups(
    images: Tensor, source: Tensor, patch_size: int, num_prefix_tokens: int, outline: bool = True
) -> Tensor:
    """Paint each token's patch group with its mean colour.

    Args:
        images: [B, 3, H, W] in [0, 1] (undo normalisation first).
        source: [B, N, T0] from :func:`atm_lightning.merge_stats`; T0 counts prefix tokens too.
        patch_size: the ViT's patch size in pixels.
        num_prefix_tokens: class/distillation/register tokens at the start of the sequence.
        outline: darken pixels on group borders.

    Returns:
        [B, 3, H, W] in [0, 1].
    """
    batch, _, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    groups = source[:, num_prefix_tokens:, num_prefix_tokens:].float()  # [B, N', gh*gw]
    group_of_patch = groups.argmax(dim=1)  # [B, gh*gw]: which token holds each patch
    patches = images[:, :, : gh * patch_size, : gw * patch_size]
    patch_mean = patches.reshape(batch, 3, gh, patch_size, gw, patch_size).mean(dim=(3, 5)).flatten(2)
    weights = groups / groups.sum(dim=2, keepdim=True).clamp_min(1)
    group_colour = torch.einsum("bnt,bct->bnc", weights, patch_mean)  # [B, N', 3]
    colour = group_colour.gather(1, group_of_patch[..., None].expand(-1, -1, 3))  # [B, T, 3]
    grid = colour.transpose(1, 2).reshape(batch, 3, gh, gw)
    painted = grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    if outline:
        ids = group_of_patch.reshape(batch, gh, gw)
        ids = ids.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).float()
        edge = torch.zeros_like(ids, dtype=torch.bool)
        edge[:, 1:, :] |= ids[:, 1:, :] != ids[:, :-1, :]
        edge[:, :, 1:] |= ids[:, :, 1:] != ids[:, :, :-1]
        painted = painted.masked_fill(edge[:, None], 0.0)
    out = images.clone()
    out[:, :, : gh * patch_size, : gw * patch_size] = painted
    return out.clamp(0, 1)
