"""Forwards that merge in the compiled CPU kernel (:mod:`atm_lightning.merge.fused`).

Where it applies (ATM's ``exact`` rule, CPU float32 inference, nothing recorded or carried), a
forward's merge steps run the kernel and its tokens stay packed after the first merge: the
token-wise layers run on the real tokens only and packed ViT blocks attend in the kernel too
(:mod:`.vit`). Everything else takes the batched step (:mod:`atm_lightning.merge.step`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from ..merge import ATM, TokenState
from ..merge.fused import fused_merge_batch, kernel_problem


def runs_fused(merging, tokens: TokenState, training: bool) -> bool:
    """Whether this forward's merge steps run the kernel: asked for, CPU float32 at inference (no
    autocast: its keys would be bfloat16) with nothing to carry or record."""
    x = tokens.x
    eligible = (
        merging.fused
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not training
        and not torch.is_grad_enabled()
        and not merging.record
        and tokens.positions is None
        and tokens.source is None
    )
    return bool(eligible) and kernel_ready(merging)


def kernel_ready(merging) -> bool:
    """Whether the kernel is there. ``fused="auto"`` builds it on the first forward that can use it
    (so a model that only ever runs on a GPU never builds it); where it cannot be built the model
    keeps the batched step (the same merges), after one warning saying why."""
    if merging.fused == "auto":
        problem = kernel_problem()
        if problem is not None:
            warnings.warn(
                f"ATM's fused merge step is unavailable, so the batched step runs (same merges, slower on a CPU): "
                f"{problem}. fused=False (--model.fused false) skips the attempt.",
                stacklevel=3,
            )
        merging.fused = problem is None
    return bool(merging.fused)


def fused_step(policy: ATM, layer: int, tokens: TokenState, attention, protected: int) -> TokenState:
    """ATM's merge step in the kernel: the same merges as the batched step, tokens packed after
    (one image: as it is). ``attention`` is the block's :class:`.loop.BlockAttention`."""
    merged = fused_merge_batch(
        tokens.x, tokens.counts(), attention.keys, attention.attention, attention.query, attention.scale,
        tokens.size, protected, policy, layer,
    )  # fmt: skip
    if merged is None:
        return tokens
    x, size, count = merged
    if len(count) == 1:  # one image is never padded: its tokens are the padded batch
        return TokenState(x.view(1, -1, x.shape[-1]), count - protected, protected, size)
    return TokenState(x, count - protected, protected, size, real_rows=real_rows(count, size.shape[1]))


def real_rows(count: Tensor, width: int) -> Tensor:
    """[T] the padded slot ``b * W + j`` of every packed row of images holding ``count`` tokens,
    built on the host (the kernel's counts are there anyway) in one copy."""
    lengths = count.numpy()
    real = np.arange(width) < lengths[:, None]
    return torch.from_numpy(np.flatnonzero(real)).to(count.device)
