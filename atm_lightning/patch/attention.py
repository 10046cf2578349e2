"""Attention for packed ragged batches: groups of images, each padded only to its own longest image.

After merging, the images of a batch hold different numbers of tokens. Packed execution runs the
token-wise layers on the real tokens only; attention, which must see each image alone, runs here
on a few groups of neighbouring images (chosen in :mod:`.ragged`). Each group runs one of two
kernels: PyTorch's fused ``scaled_dot_product_attention``, or three batched matmuls per head,
which is faster on CPU for short groups. ``python tools/attention_kernels.py`` measures both.
Where a CPU forward merges in the compiled kernel, packed ViT blocks attend there instead
(:func:`atm_lightning.merge.fused.fused_packed_attention`), reading each image's rows in place.

Padding is handled with an additive mask: ``log(size)`` for proportional attention, ``-inf`` on
padding (size 0), as :func:`attention_bias` builds it for the padded path too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .ragged import RaggedLayout

# On CPU the fused kernel splits queries into blocks of 32 below 192 tokens, where three batched
# matmuls per head run 10-40% faster as long as a chunk of score matrices stays in cache; at 192+
# tokens, and on GPUs, the fused kernel wins. Measured on 2 CPU cores (tools/attention_kernels.py).
MATMUL_ATTENTION_MAX_TOKENS = 191
MATMUL_SCORE_ELEMENTS = 2**19  # scores per head per chunk of images (2 MiB in float32)


def attention_bias(size: Tensor | None, prop_attn: bool, dtype: torch.dtype) -> Tensor | None:
    """Additive attention mask [B, 1, 1, N]: log(size) (proportional attention) or 0, -inf on padding."""
    if size is None:
        return None
    if prop_attn:
        bias = (size if size.dtype == dtype else size.to(dtype)).log()
    else:
        bias = torch.zeros_like(size, dtype=dtype).masked_fill(size == 0, float("-inf"))
    return bias.view(size.shape[0], 1, 1, size.shape[1])


def head_mean(k: Tensor, dim: int = 1, out: Tensor | None = None) -> Tensor:
    """``k.mean(dim)`` over the heads of per-head keys ([B, H, N, d] by default), bit for bit,
    but 3x faster on CPU; written into ``out`` if given.

    timm's keys are a strided view of the qkv output, where a reduction over heads is slow;
    adding the head slices in order is the same arithmetic on contiguous rows.
    """
    heads = k.unbind(dim)
    if out is not None and (len(heads) == 1 or (torch.is_grad_enabled() and k.requires_grad)):
        return out.copy_(head_mean(k, dim))  # ``out=`` ops record no gradient
    if len(heads) == 1:
        return heads[0]
    total = torch.add(heads[0], heads[1], out=out)
    for head in heads[2:]:
        total.add_(head)
    return total.div_(len(heads))


def matmul_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, first_token: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale + mask) v per head, for [G, L, H, d] views and a [G, 1, L] mask.

    One head and one chunk of images at a time: each product reads the strided views as they
    are (no copies) and the score matrices stay small enough to be reused from cache. With
    ``first_token`` ([G, L], zeros) the head-averaged attention of token 0 is written into it,
    read off the same softmax.
    """
    images, length, heads, _ = q.shape
    chunk = max(1, MATMUL_SCORE_ELEMENTS // length**2)
    out = q.new_empty(q.shape)
    for start in range(0, images, chunk):
        part = slice(start, start + chunk)
        for head in range(heads):
            scores = torch.baddbmm(mask[part], q[part, :, head], k[part, :, head].transpose(1, 2), alpha=scale)
            probs = scores.softmax(-1)
            if first_token is not None:
                first_token[part].add_(probs[:, 0])
            out[part, :, head] = torch.bmm(probs, v[part, :, head])
    if first_token is not None:
        first_token.div_(heads)
    return out


Norm = Callable[[Tensor], Tensor]


def grouped_attention(
    qkv: Tensor,
    layout: RaggedLayout,
    bias: Tensor,
    heads: int,
    scale: float,
    q_norm: Norm,
    k_norm: Norm,
    per_head_keys: bool = False,
    class_attention: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention of packed tokens, group by group: ``qkv`` [T, 3*H*d] in, mixed values [T, H*d] out.

    Each group's rows are gathered into a [G, L, 3, H, d] block padded to its longest image (the
    padding slots repeat a real row: finite, and masked out by ``bias``), normalised with
    ``q_norm``/``k_norm`` and attended; the real rows go back to their packed places. Also returns
    the keys for matching, averaged over heads [B, 1, W, d] or per head [B, H, W, d]
    (``per_head_keys``), and with ``class_attention`` the head-averaged attention of each image's
    first token (the class token) to every token, [B, W] (None otherwise).
    """
    batch, width = bias.shape[0], bias.shape[-1]
    head_dim = qkv.shape[-1] // (3 * heads)
    keys = qkv.new_zeros(batch, heads if per_head_keys else 1, width, head_dim)
    cls_attention = qkv.new_zeros(batch, width) if class_attention else None
    mixed = qkv.new_empty(len(qkv), heads * head_dim)
    for group in layout.groups:
        rows, length = group.stop - group.start, group.length
        padded = qkv.index_select(0, group.gather).view(rows, length, 3, heads, head_dim)
        mask = bias[group.start : group.stop, 0, :, :length]  # [G, 1, L]
        first = cls_attention[group.start : group.stop, :length] if cls_attention is not None else None
        k, out = _group_attention(padded, mask, scale, q_norm, k_norm, first)  # each [G, L, H, d]
        part = keys[group.start : group.stop, :, :length]
        if per_head_keys:
            part.copy_(k.transpose(1, 2))
        else:
            head_mean(k, dim=2, out=part[:, 0])
        real = out.reshape(rows * length, -1)
        if torch.is_grad_enabled():  # ``out=`` ops record no gradient
            mixed[group.packed] = real.index_select(0, group.slots)
        else:
            torch.index_select(real, 0, group.slots, out=mixed[group.packed])
    return mixed, keys, cls_attention


def _group_attention(
    padded: Tensor, mask: Tensor, scale: float, q_norm: Norm, k_norm: Norm, first_token: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Keys and attention output of one padded group, each [G, L, H, d]; with ``first_token``
    ([G, L], zeros) also the head-averaged attention of token 0, written into it."""
    if padded.device.type == "cpu" and padded.shape[1] <= MATMUL_ATTENTION_MAX_TOKENS:
        q, k = q_norm(padded[:, :, 0]), k_norm(padded[:, :, 1])  # [G, L, H, d]
        return k, matmul_attention(q, k, padded[:, :, 2], mask, scale, first_token)
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, L, d]
    q, k = q_norm(q), k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if first_token is not None:
        first_token.copy_(_first_token_attention(q, k, mask, scale))
    # The fused CPU kernel writes [G, L, H, d] memory, so the caller's reshape is a view.
    return k, out.transpose(1, 2)


def _first_token_attention(q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
    """[G, L]: head-averaged softmax attention of token 0 to every token, for [G, L, H, d] q/k."""
    logits = torch.einsum("ghd,glhd->ghl", q[:, 0], k) * scale + mask  # mask [G, 1, L]
    return logits.softmax(-1).mean(1)
