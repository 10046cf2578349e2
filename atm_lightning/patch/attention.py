"""Attention over a padded batch of merged tokens, in one call per block.

After merging, the images of a batch hold different numbers of tokens of different sizes. All of
it goes into the attention as one additive mask ``[B, 1, 1, W]``: ``log(size)`` for proportional
attention (a token of size ``s`` gets the attention its ``s`` identical patches would), ``-inf``
on padding (size 0). Two kernels take it:

- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` with the mask, what timm's fused attention
  calls (the CPU flash kernel, or the memory-efficient kernel on CUDA);
- ``flex``: ``torch.nn.attention.flex_attention`` (compiled), the mask read per key by a
  ``score_mod`` instead of materialised.

Both return the same values to float rounding; ``docs/speed.md`` says what each costs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_KERNELS = ("sdpa", "flex")


def attention_bias(size: Tensor | None, prop_attn: bool, dtype: torch.dtype) -> Tensor | None:
    """Additive attention mask [B, 1, 1, N]: log(size) (proportional attention) or 0, -inf on padding."""
    if size is None:
        return None
    if prop_attn:
        bias = (size if size.dtype == dtype else size.to(dtype)).log()
    else:
        bias = torch.zeros_like(size, dtype=dtype).masked_fill(size == 0, float("-inf"))
    return bias.view(size.shape[0], 1, 1, size.shape[1])


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: float, kernel: str) -> Tensor:
    """Attention of [B, H, W, d] queries, keys and values with the additive mask ``bias``, at
    SDPA's default scale (as timm's fused attention calls it)."""
    if kernel == "sdpa" or bias is None or dropout > 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    if kernel == "flex":
        return _flex()(q, k, v, score_mod=_bias_mod(bias))
    raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")


def _bias_mod(bias: Tensor) -> Callable:
    rows = bias.view(bias.shape[0], bias.shape[-1])

    def add_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + rows[b, kv_idx]

    return add_bias


@cache
def _flex() -> Callable:
    """``flex_attention`` compiled once (it runs compiled only), with dynamic token counts."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def check_kernel(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {kernel!r}")
