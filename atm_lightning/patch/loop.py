"""The block loop: attention residual, merge step, MLP residual, for any transformer's blocks.

In every block, after the attention residual and before the MLP, the policy's step changes the
tokens: a :class:`~atm_lightning.merge.MatchingPolicy` merges matched pairs, a
:class:`~atm_lightning.merge.PruningPolicy` prunes (:mod:`atm_lightning.merge.step`, the same
whole-batch operations for one image or many, in training and inference, on any device). The
loop knows nothing of timm: how to run one block's attention and MLP comes from a
:class:`BlockRunner` (the per-architecture adapter, e.g. :mod:`.vit`). It records only the token
counts of each block; every statistic is derived from them after the forward (:mod:`.stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..flops import ViTCost
from ..merge import (
    LayerRecord,
    Plan,
    MatchingPolicy,
    PruningPolicy,
    TokenMerger,
    TokenState,
    match_step,
    padding_mask,
    prune_step,
)
from .attention import attention_bias
from .kernel import fused_step, runs_fused
from .stats import Resume, TraceRecorder


class BlockAttention(NamedTuple):
    """What a block's attention leaves for the merge step."""

    x: Tensor  # the tokens after the attention residual
    keys: Tensor | None  # [B, H, W, d] per-head keys (the compiled kernel's forwards: as it needs them)
    attention: Tensor | None = None  # [B, W] the class token's attention, when asked for
    query: Tensor | None = None  # [B, H, 1, d] the class token's query (padded tokens)
    scale: float = 1.0  # the attention's logit scale


class KeyNeeds(NamedTuple):
    """What the merge step needs from a block's attention besides its output."""

    keys: bool = False  # the keys to match on
    class_attention: bool = False  # the class token's head-averaged attention, [B, W]
    per_head: bool = False  # the compiled kernel's forwards: every head's keys (else averaged)
    kernel: bool = False  # the step runs in the compiled kernel, which reads the class token's query itself

    @classmethod
    def of(cls, policy: TokenMerger, kernel: bool = False) -> KeyNeeds:
        if isinstance(policy, MatchingPolicy):
            return cls(True, policy.needs_class_attention, policy.key_form == "per_head", kernel)
        return cls(False, isinstance(policy, PruningPolicy))


NO_NEEDS = KeyNeeds()  # a block without a merge step needs nothing beyond its output


class BlockRunner(Protocol):
    """How one architecture runs the two halves of its blocks around the merge step."""

    def attention_residual(
        self, layer: int, block: nn.Module, tokens: TokenState, bias: Tensor | None, needs: KeyNeeds, kernel: str
    ) -> BlockAttention:
        """``x + attention(norm(x))`` for ``tokens`` (padded, or packed in the compiled kernel's
        forwards) with what ``needs`` asks for; ``kernel`` names the attention kernel."""

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        """``x + mlp(norm(x))``: token-wise, so the same for padded or packed tokens."""

    def prefix_block(self, layer: int, block: nn.Module, x: Tensor, bias: Tensor | None, prefix: int) -> Tensor:
        """The whole block for the ``prefix`` first tokens of padded ``x`` [B, W, C] only: [B, prefix, C]."""

    def remove_hooks(self) -> None:
        """Undo what the runner attached to the model."""


@dataclass
class Merging:
    """What :func:`atm_lightning.patch` attaches to a model: the policy, how to run the model's
    blocks, the FLOPs model, and the record of the last forward pass."""

    policy: TokenMerger
    blocks: BlockRunner
    cost: ViTCost
    num_protected: int  # prefix tokens (class, distillation, registers): never merged
    record: bool = False  # keep every block's decisions (record_merges)
    fused: bool | str = False  # CPU inference merges in the compiled kernel (:mod:`.kernel`); "auto": where it builds
    attention: str = "sdpa"  # the attention kernel of padded batches (:mod:`.attention`)
    run_block: Callable = None  # :func:`run_block`, or it compiled (:mod:`.compiled`)
    last: object | None = None  # the MergeTrace of the last forward (:mod:`.stats`)
    resume: list[Resume] | None = None  # where an unmerged rerun may start, kept by forwards whose policy reruns
    start: Resume | None = None  # set for the rerun: its blocks begin here (see :mod:`.rerun`)


def run_blocks(
    merging: Merging, blocks: Sequence[nn.Module], x: Tensor | None, training: bool, positions: Tensor | None = None
) -> Tensor:
    """Run ``blocks`` on tokens ``x`` [B, N, C], merging after each attention; returns the tokens
    padded (only the prefix tokens with ``last_block_prefix_only``), and keeps the record of the
    run in ``merging.last``. ``positions`` [B, N, 2] (grid positions) travel with the tokens for
    models that need them (RoPE). With ``merging.start`` set (a rerun) the blocks pick up there
    instead and ``x`` is not read.
    """
    policy, protected = merging.policy, merging.num_protected
    start, merging.start = merging.start, None
    tokens = start.tokens if start is not None else TokenState.start(x, protected, policy.trace_source, positions)
    first = start.layer if start is not None else 0
    steps = policy.merges and tokens.batch > 0
    fused = steps and runs_fused(merging, tokens, training)
    recorder = TraceRecorder(tokens, first, fused, policy.rerun_margin > 0 and steps and not training, merging.cost)
    prefix_only = protected if policy.last_block_prefix_only and not training else 0
    bias, bias_size = None, None
    for layer, block in enumerate(blocks[first:], start=first):
        if tokens.size is not bias_size:  # sizes change only where a step merged
            bias, bias_size = attention_bias(tokens.size, policy.prop_attn, tokens.x.dtype), tokens.size
        if prefix_only and layer == len(blocks) - 1:  # the head reads the prefix tokens alone
            out = merging.blocks.prefix_block(layer, block, tokens.padded(), bias, prefix_only)
            merging.last, merging.resume = recorder.finish(tokens, prefix_only)
            return out
        if layer == first and start is not None:  # a rerun starts after its first block's attention
            tokens = tokens.with_x(merging.blocks.mlp_residual(block, tokens.x))
        else:
            step = steps and policy.merges_in(layer)
            attended, tokens, record = merging.run_block(
                merging.blocks, policy, layer, block, tokens, bias, step, fused, merging.attention, protected, merging.record
            )
            if step:
                recorder.step(layer, policy, attended, record)
        recorder.block_done(tokens)
    merging.last, merging.resume = recorder.finish(tokens)
    return tokens.padded()


def run_block(
    blocks: BlockRunner,
    policy: TokenMerger,
    layer: int,
    block: nn.Module,
    tokens: TokenState,
    bias: Tensor | None,
    step: bool,
    fused: bool,
    kernel: str,
    protected: int,
    record: bool,
) -> tuple[TokenState, TokenState, LayerRecord | None]:
    """One block: its attention residual, the policy's merge step where ``step``, its MLP residual.
    Returns the tokens after the attention, the tokens after the block, and the step's record."""
    out = blocks.attention_residual(layer, block, tokens, bias, KeyNeeds.of(policy, fused) if step else NO_NEEDS, kernel)
    attended = merged = tokens.with_x(out.x)
    move = decisions = None
    if step and isinstance(policy, PruningPolicy):
        move = prune_step(policy, layer, attended, out.attention, protected)
    elif step and fused:
        merged = fused_step(policy, layer, attended, out, protected)
    elif step:
        neg = padding_mask(bias, policy.prop_attn) if attended.padded_batch else None
        move, decisions = match_step(policy, layer, attended, out.keys, out.attention, neg, protected, record)
    if move is not None:
        width = move.plan.width
        if width is None:  # images merged different counts: the one host read of the step
            width = read_width(move.plan) + protected
        merged = move.apply(width)
    return attended, merged.with_x(blocks.mlp_residual(block, merged.x)), decisions


@torch.compiler.disable
def read_width(plan: Plan) -> int:
    """The widest image's tokens that may merge, read on the host: the one wait for the device in a
    merge step. Called from :func:`run_block` itself, so that a compiled block breaks its graph
    there, once, and runs this eagerly."""
    return int(plan.widest())
