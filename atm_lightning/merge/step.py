"""One block's merge step for a whole batch: matching (ToMe, ATM) or pruning (EViT).

A step reads the tokens after the block's attention, its keys and (where the policy asks) the
class token's attention, and returns the tokens the MLP runs on. Every image is decided and
merged by the same few whole-batch operations (:mod:`.matching`, :mod:`.costs`, :mod:`.merging`),
the same number whatever the batch size; the host reads one number, the new padded width, and
only where images merge different counts (ATM's ``exact`` rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .matching import Split, alternating_split, best_matches, key_features, size_split
from .merging import (
    Plan,
    alternating_group_keys,
    as_dtype,
    combine,
    mean_tokens,
    move_matrix,
    plan,
    positions,
    size_group_keys,
)
from .policies import MatchingPolicy
from .pruning import EViT
from .selection import MatchContext
from .tokens import TokenState


@dataclass(frozen=True)
class LayerRecord:
    """What one block's merge step decided, kept only with ``record_merges=True`` (tests, debugging)."""

    layer: int  # 0-indexed block
    split: str
    threshold: float | None
    similarity: Tensor  # [B, Na] best-match similarity per source slot (-inf: not real)
    selected: Tensor  # [B, Na] bool
    a_size: Tensor  # [B, Na] sizes of the source slots (0: not real)
    b_size: Tensor  # [B, Nb] sizes of the destination slots (0: not real)
    dst_size: Tensor  # [B, Na] size of each source's matched destination


def padding_mask(bias: Tensor | None, prop_attn: bool) -> Tensor | None:
    """[B, W] 0 on real slots and -inf on padding, from the block's attention ``bias`` [B, 1, 1, W]
    (``log(size)`` with proportional attention, else 0 / -inf); None when there is no padding."""
    if bias is None:
        return None
    flat = bias.view(bias.shape[0], bias.shape[-1])
    return flat.clamp_max(0) if prop_attn else flat


@dataclass(frozen=True)
class Move:
    """A merge step decided on the device: where every token goes. :meth:`apply` moves them once
    the merged batch's width is known: ``plan.width``, or read from ``plan.widest()`` (the one
    host sync of a step where images merge different counts; the block loop reads it itself, so
    that a compiled block breaks its graph there once)."""

    tokens: TokenState
    size: Tensor  # [B, W] the tokens' sizes (``tokens.sizes()``)
    plan: Plan
    weight: Tensor | None = None  # [B, W] each input's weight in its output (pruning); None: size-weighted means
    keep_norm: bool = False

    def apply(self, width: int) -> TokenState:
        """The merged tokens, ``width`` (W') slots per image."""
        tokens, plan, dtype = self.tokens, self.plan, self.tokens.x.dtype
        by_size = move_matrix(plan, self.size, width)  # in the sizes' type: they sum exactly
        new_size = by_size.sum(dim=-1)
        if self.weight is None:
            x = mean_tokens(tokens.x, as_dtype(by_size, dtype), new_size, self.keep_norm)
        else:
            matrix = move_matrix(plan, as_dtype(self.weight, dtype), width)
            x = combine(tokens.x, matrix) / matrix.sum(dim=-1, keepdim=True)
        positions = source = None
        if tokens.positions is not None:  # the mean grid position of each token's patches
            moved = combine(tokens.positions, as_dtype(by_size, tokens.positions.dtype))
            positions = moved / new_size[..., None].clamp_min(1)
        if tokens.source is not None:  # sums: each input's sources once, whatever its size
            source = combine(tokens.source, move_matrix(plan, as_dtype(self.size > 0, tokens.source.dtype), width))
        return TokenState(x, plan.free, tokens.protected, new_size, positions, source)


def match_step(
    policy: MatchingPolicy,
    layer: int,
    tokens: TokenState,
    keys: Tensor,
    attention: Tensor | None,
    neg: Tensor | None,
    protected: int,
    record: bool = False,
) -> tuple[Move | None, LayerRecord | None]:
    """ToMe/ATM: each source's best destination by the policy's similarity, the policy's choice of
    which merge, and where every token goes (None: nothing can merge). ``keys`` [B, H, W, d] per
    head; ``attention`` [B, W] the class token's attention (policies that weigh by it); ``neg``
    [B, W] (:func:`padding_mask`)."""
    width = tokens.width
    if width - protected < 2:  # no pair to form
        return None, None
    size = tokens.sizes()
    split = _split(policy.split_kind(layer), size, tokens.free, protected, neg, width)
    features, scale = key_features(keys, policy.key_form == "per_head")
    rows, cols = split.take(features)
    weight = policy.pair_weight(split, size, attention, tokens.free)
    matches = best_matches(rows, cols, scale, split.col_mask, weight)
    context = MatchContext(layer, split, matches, size, tokens.free)
    selected, merges = policy.select(context)
    kept_record = _record(policy, context, selected) if record else None
    if merges == 0:
        return None, kept_record
    col_pos = split.col_pos.expand(len(size), -1) if split.order is None else split.col_pos
    row_pos = split.row_pos.expand(len(size), -1)
    source_target = torch.where(selected, col_pos.gather(1, matches.dst), row_pos)
    target = _positions(tokens).scatter(1, row_pos, source_target)
    if split.order is None:
        group_key = alternating_group_keys(width, protected, size.device)
    else:
        group_key = size_group_keys(split.col_pos, split.is_source, width)
    moves = plan(size, target, group_key, tokens.free, protected, merges)
    return Move(tokens, size, moves, keep_norm=policy.keeps_norm), kept_record


def _split(kind: str, size: Tensor, free: Tensor | int, protected: int, neg: Tensor | None, width: int) -> Split:
    if kind == "size":
        return size_split(size, free, protected, neg)
    split = alternating_split(width, protected, size.device)
    if neg is None:
        return split
    return dataclasses.replace(split, col_mask=neg[:, None, split.col_slice])


def _positions(tokens: TokenState) -> Tensor:
    """[B, W] every slot's own position (a view; ``scatter`` copies it)."""
    return positions(tokens.width, tokens.x.device).expand(tokens.batch, -1)


def prune_step(policy: EViT, layer: int, tokens: TokenState, attention: Tensor, protected: int) -> Move | None:
    """EViT: keep the tokens the class token attends to most; fuse the others into one token, their
    attention-weighted mean, placed after the kept ones (its size the sum of theirs). None: this
    block keeps every token."""
    if not isinstance(tokens.free, int):
        raise ValueError("pruning keeps the same token count in every image; a padded batch cannot prune")
    width, unprotected = tokens.width, tokens.free
    keep = policy.keep(layer, unprotected)
    if keep is None or keep >= unprotected:
        return None
    order = attention[:, protected:].argsort(dim=1, descending=True) + protected  # most attended first
    kept, pruned = order[:, :keep], order[:, keep:]
    slots = _positions(tokens)
    # Every pruned token goes to the most attended of them, the fused token, ordered last.
    target = slots.scatter(1, pruned, pruned[:, :1].expand(-1, unprotected - keep))
    group_key = (slots + 2 * width).scatter(1, kept, kept + width)
    group_key[:, :protected] = slots[:, :protected]
    merges = unprotected - keep - (1 if policy.fuse_token else 0)
    size = tokens.sizes()
    moves = plan(size, target, group_key, unprotected, protected, merges)
    is_pruned = torch.zeros_like(size, dtype=torch.bool).scatter_(1, pruned, True)
    return Move(tokens, size, moves, weight=torch.where(is_pruned, as_dtype(attention, size.dtype), 1.0))


def _record(policy: MatchingPolicy, context: MatchContext, selected: Tensor) -> LayerRecord:
    split, matches = context.split, context.matches
    real = context.real_rows()
    a_size, b_size = split.take(context.size)
    if real is None:
        real = torch.ones_like(selected)
    similarity = (matches.score - matches.offset).masked_fill(~real, float("-inf"))
    if split.col_mask is not None:
        b_size = b_size * (split.col_mask[:, 0] == 0)
    return LayerRecord(
        layer=context.layer,
        split=policy.split_kind(context.layer),
        threshold=policy.threshold(context.layer),
        similarity=similarity.detach(),
        selected=(selected & real).detach(),
        a_size=a_size * real,
        b_size=b_size,
        dst_size=b_size.gather(1, matches.dst) * real,
    )
