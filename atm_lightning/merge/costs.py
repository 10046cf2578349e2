"""What it costs to merge a pair: the cosine similarity, or an estimate of the damage done.

Plain cosine similarity (ToMe, ATM) treats every pair alike. Two refinements make a threshold mean
the same damage wherever it is applied:

- size weighting: merging tokens of sizes ``n_a`` and ``n_b`` moves their ``n_a + n_b`` patches by
  ``n_a n_b / (n_a + n_b) * ||x_a - x_b||^2`` in total (the paper's Theorem 1), so two large tokens
  cost more than two fresh patches at the same similarity;
- attention weighting: a token the class token hardly attends to changes the output little
  however it is merged, one it attends to strongly changes it a lot.

Both scale the pair's dissimilarity ``1 - cos`` and give back an *effective similarity*
``1 - (1 - cos) * weight``. The weight is 1 for two fresh patches of average attention, so
thresholds keep their meaning: a pair of such patches merges exactly when its cosine does.

With ``u = 1/n`` and ``rho = M a / n`` per token (``a`` the class token's attention, ``M`` the
image's unprotected tokens), the size factor is ``2 / (u_a + u_b)`` and the attention share
``(rho_a + rho_b) / (u_a + u_b)``: per-token values added pairwise, so a weight costs five
full-size operations whatever the options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matching import Split, constant
from .merging import as_dtype


def pair_weight(
    split: Split,
    size: Tensor,
    size_weighted: bool,
    attention: Tensor | None = None,
    attention_power: float = 0.0,
    num_unprotected: Tensor | int | None = None,
) -> Tensor | None:
    """[B, Na, Nb] factor on each pair's dissimilarity, or None when every factor is 1.

    ``size`` [B, W] holds the tokens' sizes (0 on padding, whose pairs the split masks);
    ``attention`` [B, W] the class token's attention (rows sum to 1) and ``num_unprotected`` [B]
    (or one int for all) the tokens that may merge, for attention weighting: a pair weighs
    ``(M * a_pair) ** attention_power``, with ``a_pair`` the attention of the merged token's
    patches, ``(a_a n_b + a_b n_a) / (n_a + n_b)`` (each token's attention shared out to the
    other's patches, as the merged token's value is), so an average token weighs 1.
    """
    if not size_weighted and attention_power == 0.0:
        return None
    inverse = size.clamp_min(1).reciprocal()  # padding as size 1: finite, and masked anyway
    u_rows, u_cols = split.take(inverse)
    total = u_rows[:, :, None] + u_cols[:, None, :]  # 1/n_a + 1/n_b
    if attention_power == 0.0:
        return torch.div(constant(2.0, total), total)  # 2 n_a n_b / (n_a + n_b)
    if attention is None or num_unprotected is None:
        raise ValueError("attention weighting needs the class token's attention and the token counts")
    # (M a_pair)^p = ((rho_a + rho_b) / total)^p; the size factor 2/total folds in as total^-1 and 2^(1/p) on rho.
    scale = 2.0 ** (1.0 / attention_power) if size_weighted else 1.0
    scale = num_unprotected[:, None] * scale if isinstance(num_unprotected, Tensor) else float(num_unprotected) * scale
    rho_rows, rho_cols = split.take(as_dtype(attention, inverse.dtype) * inverse * scale)
    share = (rho_rows[:, :, None] + rho_cols[:, None, :]).pow_(attention_power)
    exponent = attention_power + 1.0 if size_weighted else attention_power
    return share.mul_(total.pow_(-exponent))
