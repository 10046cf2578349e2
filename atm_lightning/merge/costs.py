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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matching import Matches, Split, with_trash_row


def pair_weight(
    split: Split,
    size: Tensor,
    size_weighted: bool,
    attention: Tensor | None = None,
    attention_power: float = 0.0,
    num_unprotected: Tensor | None = None,
) -> Tensor | None:
    """[B, Na, Nb] factor on each pair's dissimilarity, or None when every factor is 1.

    ``size`` [B, N] holds the tokens' sizes; ``attention`` [B, N] the class token's attention
    (rows sum to 1) and ``num_unprotected`` [B] the tokens that may merge, for attention weighting:
    a pair weighs ``(M * a_pair) ** attention_power``, with ``a_pair`` the attention of the
    merged token's patches, ``(a_a n_b + a_b n_a) / (n_a + n_b)`` (each token's attention shared
    out to the other's patches, as the merged token's value is), so an average token weighs 1.
    """
    if not size_weighted and attention_power == 0.0:
        return None
    # Every [B, Na, Nb] step after the first writes in place: at small batches on a CPU these
    # steps are a large part of the merge step's time.
    n_a, n_b = slot_pairs(size, split)
    total = (n_a + n_b).clamp_min_(1e-12)  # slots that are not real have size 0 and stay masked
    weight = ((n_a + n_a) * n_b).div_(total) if size_weighted else None  # n_a + n_a: 2 n_a exactly, in one op
    if attention_power != 0.0:
        if attention is None or num_unprotected is None:
            raise ValueError("attention weighting needs the class token's attention and the token counts")
        # M a_a and M a_b are per slot, so the pair's share takes two full-size products, not three.
        scaled = attention.to(size.dtype) * _per_image(num_unprotected, split, size.dtype)
        a_a, a_b = slot_pairs(scaled, split)
        share = (a_a * n_b).addcmul_(a_b, n_a).div_(total)
        factor = share.clamp_min_(1e-6).pow_(attention_power)
        weight = factor if weight is None else weight.mul_(factor)
    return weight


def slot_pairs(values: Tensor, split: Split) -> tuple[Tensor, Tensor]:
    """``values`` [B, N] of every source slot as [B, Na, 1] and of every destination slot as
    [B, 1, Nb] (0 for slots that are not real), ready to broadcast over pairs.

    Without padding the slots index ``values`` directly, as views where the split is a slice.
    """
    if not split.all_real:
        values = with_trash_row(values)
    elif split.a_slice is not None and split.b_slice is not None:
        batch, n = values.shape
        return values.view(batch, n, 1)[:, split.a_slice], values.view(batch, 1, n)[:, :, split.b_slice]
    return values.gather(1, split.a_idx)[:, :, None], values.gather(1, split.b_idx)[:, None, :]


def _per_image(count: Tensor, split: Split, dtype: torch.dtype) -> Tensor | int:
    """``count`` [B] as a [B, 1] factor on per-token values; a plain int when no image is padded,
    since every image then holds all ``Na + Nb`` slots (the count of tokens that may merge)."""
    if split.all_real:
        return split.a_idx.shape[1] + split.b_idx.shape[1]
    return count.to(dtype)[:, None]


def effective_matches(matches: Matches, split: Split, weight: Tensor | None) -> Matches:
    """Each source's best destination by effective similarity ``1 - (1 - cos) * weight``
    (``weight``, from :func:`pair_weight`, is used up: it is overwritten)."""
    if weight is None:
        return matches
    # ``1 - (1 - cos) * w`` written so that a weight of exactly 1 leaves the cosine bit for bit.
    weight = weight if weight.dtype == matches.scores.dtype else weight.to(matches.scores.dtype)
    scores = matches.scores - (1 - matches.scores).mul_(weight.sub_(1))  # ``weight`` is this step's own
    if scores.shape[-1] == 0:
        return Matches(matches.similarity, scores)
    if split.all_real:  # nothing to mask
        return Matches(scores.amax(dim=-1), scores)
    scores.masked_fill_(~split.b_ok[:, None, :], float("-inf"))
    similarity = scores.amax(dim=-1).masked_fill_(~split.a_ok, float("-inf"))
    return Matches(similarity, scores)


def per_head_keys(keys: Tensor) -> Tensor:
    """[B, N, H*d] from per-head keys [B, H, N, d], each head L2-normalised and scaled by
    ``1/sqrt(H)``: rows of unit length whose dot product is the mean of the heads' cosine
    similarities."""
    batch, heads, n, _ = keys.shape
    # ``F.normalize`` written out, on [B, N, H, d]: the results come out in the order the reshape
    # reads them, so it is a view (timm's keys are a view of that layout already).
    rows = keys.transpose(1, 2)
    normed = rows / (rows.norm(dim=-1, keepdim=True).clamp_min(1e-12) * heads**0.5)  # one full-size division
    return normed.reshape(batch, n, -1)
