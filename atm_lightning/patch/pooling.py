"""Pooling of merged tokens: each token counts as many patches as it holds.

Average pooling weights every token by its size; attention pooling (timm's ``AttentionPoolLatent``,
``global_pool='map'``: SigLIP, SigLIP 2) adds ``log(size)`` to the pooling attention's logits
(proportional attention on its keys), so a merged token of size ``s`` receives the attention its
``s`` identical copies would. Padding (size 0) gets weight 0 and logit ``-inf``. Before any merge
(no sizes) the model's own pooling runs, so unmerged logits are timm's bit for bit.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import attention_bias


def pool_merged(model: nn.Module, x: Tensor, pool_type: str, size: Tensor, start: int) -> Tensor:
    """Pool features ``x`` [B, W, C] of merged tokens with sizes ``size`` [B, W] as ``model`` would
    pool the patches they stand for: its ``attn_pool`` head if it has one, else ``pool_type``
    ``avg``; tokens before ``start`` (prefix tokens the model leaves out) are not pooled."""
    if size.shape != x.shape[:2]:
        raise ValueError(
            f"features of {tuple(x.shape[:2])} tokens, but the last forward left {tuple(size.shape)}: the "
            f"head pools with the sizes of the forward that made the features, so call it right after that forward"
        )
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        x, size = x[:, start:], size[:, start:]
        return attn_pool(x, attn_mask=attention_bias(size, True, x.dtype))
    if pool_type != "avg":
        raise ValueError(
            f"merged tokens are pooled by size only with token, avg or map pooling, got {pool_type!r}: "
            f"choose one of those (model.reset_classifier(num_classes, 'avg')), or unpatch the model"
        )
    weights = size[:, start:, None].to(x.dtype)  # padding has weight 0
    return (x[:, start:] * weights).sum(1) / weights.sum(1)
