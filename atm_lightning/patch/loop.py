"""The block loop: attention residual, merge step, MLP residual, for any transformer's blocks.

In every block, after the attention residual and before the MLP, the policy's step changes the
tokens: a :class:`~atm_lightning.merge.MatchingPolicy` merges matched pairs, a
:class:`~atm_lightning.merge.PruningPolicy` prunes. The loop knows nothing of timm: how to run one
block's attention and MLP comes from a :class:`BlockRunner` (the per-architecture adapter, e.g.
:mod:`.vit`), so each of those stays one self-contained call per block.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..flops import ViTCost
from ..merge import (
    MatchContext,
    MatchingPolicy,
    PruningPolicy,
    Split,
    TokenMerger,
    alternating_split,
    best_matches,
    class_attention,
    merge_tokens,
    per_head_keys,
    prune_inattentive,
    size_sorted_split,
)
from ..merge.fused import fused_merge, fused_merge_batch, kernel_problem
from ..merge.unpadded import full_alternating_split, full_size_sorted_split, merge_single_image, num_sources
from .attention import attention_bias, head_mean
from .state import TokenState
from .stats import LayerRecord, MergeTrace, TraceRecorder

RAGGED_MODES = ("packed", "padded")


class BlockAttention(NamedTuple):
    """What a block's attention leaves for the merge step."""

    keys: Tensor  # [B, H, W, d] per-head keys, or [B, 1, W, d] already averaged over heads
    query_cls: Tensor | None  # [B, H, 1, d] the class token's query (padded runs only)
    scale: float  # the attention's logit scale
    class_attention: Tensor | None = None  # [B, W] the class token's attention, when asked for


class KeyNeeds(NamedTuple):
    """What the merge step needs from a block's attention beyond head-averaged keys."""

    per_head_keys: bool = False  # every head's keys, [B, H, W, d]
    class_attention: bool = False  # the class token's head-averaged attention, [B, W]
    compiled: bool = False  # the forward merges in the compiled kernel, so packed attention may run there too

    @classmethod
    def of(cls, policy: TokenMerger) -> KeyNeeds:
        if isinstance(policy, MatchingPolicy):
            return cls(policy.key_form == "per_head", policy.needs_class_attention)
        return cls()


NO_NEEDS = KeyNeeds()  # a block without a merge step needs nothing beyond its output


class BlockRunner(Protocol):
    """How one architecture runs the two halves of its blocks around the merge step."""

    def attention_residual(
        self, layer: int, block: nn.Module, state: TokenState, bias: Tensor | None, needs: KeyNeeds
    ) -> tuple[Tensor, BlockAttention]:
        """``x + attention(norm(x))`` for ``state.x`` (padded or packed), with the block's keys
        (per head with ``needs.per_head_keys``, else averaged or per head) and, with
        ``needs.class_attention``, the class token's attention."""

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        """``x + mlp(norm(x))``: token-wise, so the same for padded or packed tokens."""

    def prefix_block(self, layer: int, block: nn.Module, x: Tensor, bias: Tensor | None, prefix: int) -> Tensor:
        """The whole block for the ``prefix`` first tokens of padded ``x`` [B, W, C] only: [B, prefix, C]."""


@dataclass(frozen=True)
class Resume:
    """Where an unmerged rerun picks up: the batch's tokens after block ``layer``'s attention and
    before its merge step, the first that merged anything. Up to there every block ran as the
    unmerged model, so the rerun starts with that block's MLP instead of the patch embedding."""

    layer: int
    state: TokenState  # unmerged: padded [B, N, C], input order

    def images(self, rows: Tensor) -> Resume:
        """The same point for the images ``rows`` ([B] bool) only."""
        s = self.state  # unmerged: no sizes, and no packing or reordering yet
        source = None if s.source is None else s.source[rows]
        coords = None if s.coords is None else s.coords[rows]
        return Resume(self.layer, TokenState(s.x[rows], s.count[rows], source=source, coords=coords))


@dataclass
class Merging:
    """What :func:`atm_lightning.patch` attaches to a model: the policy, how to run the model's
    blocks, the FLOPs model, and the record of the last forward pass."""

    policy: TokenMerger
    blocks: BlockRunner
    cost: ViTCost
    num_protected: int  # prefix tokens (class, distillation, registers): never merged
    record: bool = False  # keep every block's decisions (record_merges)
    ragged: str = "packed"  # how images with different token counts run, one of RAGGED_MODES
    fused: bool | str = False  # CPU inference merges through the compiled step (:mod:`..merge.fused`); "auto": where it builds
    last: MergeTrace | None = None
    resume: Resume | None = None  # kept by a merged forward whose policy reruns, for that rerun
    start: Resume | None = None  # set for the rerun: its blocks begin here (see :mod:`.rerun`)


class StepResult(NamedTuple):
    state: TokenState
    matching_macs: Tensor  # [B] similarity computations, rows as in the state the step started from
    record: LayerRecord | None = None


Step = Callable[[Merging, int, TokenState, BlockAttention, Tensor | None, bool], StepResult]


def run_blocks(
    merging: Merging, blocks: Sequence[nn.Module], x: Tensor | None, training: bool, coords: Tensor | None = None
) -> Tensor:
    """Run ``blocks`` on tokens ``x`` [B, N, C], merging after each attention; returns the tokens
    padded and in input order (only the prefix tokens with ``last_block_prefix_only``), and keeps
    the record of the run in ``merging.last``. ``coords``
    [B, N, 2] (grid positions) travel with the tokens for models that need positions (RoPE).
    With ``merging.start`` set (a rerun) the blocks pick up there instead and ``x`` is not read.

    Packed execution (``ragged="packed"``) is for inference only: drop-path needs the batch as it is.
    """
    policy = merging.policy
    step = step_for(policy)
    pack = merging.ragged == "packed" and not training
    start, merging.start, merging.resume = merging.start, None, None
    state = start.state if start is not None else TokenState.start(x, policy.trace_source, coords)
    if len(state.x) == 0:  # an empty batch: nothing to match, as in timm's own forward
        step = None
    first = start.layer if start is not None else 0
    keep_resume = step is not None and policy.rerun_margin > 0 and not training
    recorder = TraceRecorder(state, first)
    needs = KeyNeeds.of(policy)
    if step is match_step and runs_fused(merging, state, training, pack):
        recorder.fused = True
        if len(state.x) == 1:
            step, needs = fused_step, needs._replace(class_attention=False)  # the fused step computes it
        else:
            step, needs = fused_batch_step, needs._replace(compiled=True)
    prefix_only = merging.num_protected if policy.last_block_prefix_only and not training else 0
    bias, bias_size = None, None
    for layer, block in enumerate(blocks[first:], start=first):
        if state.size is not bias_size:  # sizes change only where a step merged
            bias, bias_size = attention_bias(state.size, policy.prop_attn, state.x.dtype), state.size
        if prefix_only and layer == len(blocks) - 1:  # the head reads the prefix tokens alone
            prefix = merging.blocks.prefix_block(layer, block, state.padded(), bias, prefix_only)
            recorder.block_done(replace(state, count=torch.full_like(state.count, prefix_only)))
            merging.last = recorder.finish(state, prefix_only)
            return state.in_input_order(prefix)
        if layer > first or start is None:  # a rerun starts after its first block's attention
            steps = step is not None and policy.merges_in(layer)
            tokens, attention = merging.blocks.attention_residual(layer, block, state, bias, needs if steps else NO_NEEDS)
            state = state.with_x(tokens)
            if steps:
                result = step(merging, layer, state, attention, bias, pack)
                recorder.merge_step(state, result.matching_macs, result.record)
                if recorder.resume_layer is None and result.state is not state:
                    recorder.resume_layer = layer
                    merging.resume = Resume(layer, state) if keep_resume else None
                state = result.state
        state = state.with_x(merging.blocks.mlp_residual(block, state.x))
        recorder.block_done(state)
    merging.last = recorder.finish(state)
    return state.features()


def step_for(policy: TokenMerger) -> Step | None:
    """The merge step of a policy's kind; None when it never merges (the model runs as dense)."""
    if not policy.merges:
        return None
    if isinstance(policy, MatchingPolicy):
        return match_step
    if isinstance(policy, PruningPolicy):
        return prune_step
    raise TypeError(f"{type(policy).__name__} is neither a MatchingPolicy nor a PruningPolicy")


def match_step(
    merging: Merging, layer: int, state: TokenState, attention: BlockAttention, bias: Tensor | None, pack: bool
) -> StepResult:
    """ToMe/ATM: bipartite matching on head-averaged keys, then the policy's selection.

    With ``pack`` the merged tokens come out sorted by token count and packed (see
    :func:`~atm_lightning.merge.merge_tokens`).
    """
    policy, protected = merging.policy, merging.num_protected
    size = state.sizes()
    split = choose_split(policy.split_kind(layer), state, size, protected)
    per_head = policy.key_form == "per_head"
    metric = per_head_keys(attention.keys) if per_head else head_mean(attention.keys)
    matches = best_matches(metric, split, normalized=per_head)
    context = MatchContext(layer, split, matches, size, state.count - protected, attention.class_attention)
    context = replace(context, matches=policy.score(context))
    selected = policy.select(context)
    with_class = attention.class_attention is not None
    cost = matching_cost(merging.cost, split, metric.shape[-1], state.count, protected, with_class)
    record = layer_record(policy, context, selected) if merging.record else None
    if split.all_real and len(size) == 1 and state.carried() is None:  # nothing summed beside sizes
        merged = merge_single_image(state.x, size, split, context.matches, selected, protected, policy.keeps_norm)
        return StepResult(state if merged is None else state.after(merged, merging.cost.attn_width), cost, record)
    if not bool(selected.any()):
        return StepResult(state, cost, record)
    merged = merge_tokens(
        state.x, size, state.carried(), split, context.matches, selected, protected,
        sort_images=pack, pack=pack, keep_norm=policy.keeps_norm,
    )
    return StepResult(state.after(merged, merging.cost.attn_width), cost, record)


def runs_fused(merging: Merging, state: TokenState, training: bool, pack: bool) -> bool:
    """Whether this forward's merge steps run fused: asked for, CPU float32 at inference (no
    autocast: its keys would be bfloat16) with nothing to carry or record, and one image or a
    packed batch (anything else takes the eager step)."""
    x = state.x
    eligible = (
        merging.fused
        and (len(x) == 1 or pack)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not training
        and not torch.is_grad_enabled()
        and not merging.record
        and state.carried() is None
    )
    return bool(eligible) and kernel_ready(merging)


def kernel_ready(merging: Merging) -> bool:
    """Whether the fused kernel is there. ``fused="auto"`` builds it on the first forward that
    can use it (so a model that only ever runs on a GPU never builds it); where it cannot be
    built the model keeps the eager step (the same merges), after one warning saying why."""
    if merging.fused == "auto":
        problem = kernel_problem()
        if problem is not None:
            warnings.warn(
                f"ATM's fused merge step is unavailable, so the eager step runs (same merges, slower on a CPU): "
                f"{problem}. fused=False (--model.fused false) skips the attempt.",
                stacklevel=2,
            )
        merging.fused = problem is None
    return bool(merging.fused)


def fused_step(
    merging: Merging, layer: int, state: TokenState, attention: BlockAttention, bias: Tensor | None, pack: bool
) -> StepResult:
    """:func:`match_step` for one image without padding, as one compiled function (:mod:`..merge.fused`)."""
    policy, protected = merging.policy, merging.num_protected
    merged = fused_merge(state.x, attention.keys, attention.query_cls, state.size, attention.scale, protected, policy, layer)
    cost = fused_matching_cost(merging, layer, state.count, attention.keys)
    return StepResult(state if merged is None else state.after(merged, merging.cost.attn_width), cost)


def fused_batch_step(
    merging: Merging, layer: int, state: TokenState, attention: BlockAttention, bias: Tensor | None, pack: bool
) -> StepResult:
    """:func:`match_step` for a packed batch, as one compiled function run over the images in
    parallel (:mod:`..merge.fused`); the same merges, the same output layout."""
    policy, protected = merging.policy, merging.num_protected
    merged = fused_merge_batch(
        state.x, state.count, attention.keys, attention.class_attention, state.size, protected, policy, layer
    )
    cost = fused_matching_cost(merging, layer, state.count, attention.keys)
    return StepResult(state if merged is None else state.after(merged, merging.cost.attn_width), cost)


def fused_matching_cost(merging: Merging, layer: int, count: Tensor, keys: Tensor) -> Tensor:
    """[B] MACs of a fused step's matching (as :func:`matching_cost` counts them): every image
    holds all its ``count`` tokens, so its split's sizes follow from the count alone. Worked out
    on the host from the counts, and kept for single images: the fused step runs on the CPU, where
    building the same value per block costs more than the step's own bookkeeping at batch 1."""
    policy = merging.policy
    _, heads, _, head_dim = keys.shape
    width = heads * head_dim if policy.key_form == "per_head" else head_dim
    step = (merging.cost, policy.split_kind(layer), merging.num_protected, width, policy.needs_class_attention)
    if len(count) == 1:
        return _one_image_matching_macs(*step, int(count[0]))
    return torch.tensor([_image_matching_macs(*step, n) for n in count.tolist()], dtype=torch.float64)


@lru_cache(maxsize=4096)
def _image_matching_macs(cost: ViTCost, kind: str, protected: int, width: int, with_class: bool, n: int) -> float:
    """MACs of one image's matching step over ``n`` real tokens (see :func:`fused_matching_cost`)."""
    num_a = num_sources(kind, n, protected)
    macs = cost.matching_macs(num_a, n - protected - num_a, width)
    return macs + cost.class_attention_macs(n) if with_class else macs


@lru_cache(maxsize=4096)
def _one_image_matching_macs(cost: ViTCost, kind: str, protected: int, width: int, with_class: bool, n: int) -> Tensor:
    """:func:`_image_matching_macs` as a [1] tensor, shared between calls: read it, never write to it."""
    return torch.tensor([_image_matching_macs(cost, kind, protected, width, with_class, n)], dtype=torch.float64)


def matching_cost(
    cost: ViTCost, split: Split, width: int, count: Tensor, num_protected: int, class_attention: bool
) -> Tensor:
    """[B] MACs of one matching step: the similarities, plus the class token's attention to the
    ``count`` [B] tokens where the step computed it."""
    if split.all_real:  # every image holds all its tokens, the protected ones and the split's
        num_a, num_b = split.a_idx.shape[1], split.b_idx.shape[1]
        macs = cost.matching_macs(num_a, num_b, width)
        if class_attention:
            macs += cost.class_attention_macs(num_protected + num_a + num_b)
        return torch.full((len(split.a_idx),), macs, device=split.a_idx.device, dtype=torch.float64)
    macs = cost.matching_macs(split.a_ok.sum(1), split.b_ok.sum(1), width)
    return macs + cost.class_attention_macs(count) if class_attention else macs


def choose_split(kind: str, state: TokenState, size: Tensor, protected: int) -> Split:
    """The policy's split for ``state``; without index masks when no image is padded (before the
    first merge, or one image alone)."""
    padded = state.size is not None and (state.x.dim() == 2 or len(size) > 1)
    if kind == "size":
        return size_sorted_split(size, protected) if padded else full_size_sorted_split(size, protected)
    if padded:
        return alternating_split(size > 0, protected)
    return full_alternating_split(len(size), size.shape[1], protected, size.device)


def prune_step(
    merging: Merging, layer: int, state: TokenState, attention: BlockAttention, bias: Tensor | None, pack: bool
) -> StepResult:
    """EViT: keep the tokens the class token attends to most, fuse the rest.

    Pruning keeps equal token counts across images, so it never packs and always has the query.
    """
    policy, protected, count = merging.policy, merging.num_protected, state.count
    keep = policy.keep(layer, count - protected)
    if keep is None:
        return StepResult(state, torch.zeros_like(count, dtype=torch.float64))
    query = attention.query_cls
    weights = class_attention(query, attention.keys, attention.scale, bias)
    cost = merging.cost.class_attention_macs(count)
    if not bool((keep < count - protected).any()):
        return StepResult(state, cost)
    pruned = prune_inattentive(state.x, state.sizes(), state.carried(), weights, keep, protected, policy.fuse_token)
    return StepResult(state.after(pruned, merging.cost.attn_width), cost)


def layer_record(policy: MatchingPolicy, context: MatchContext, selected: Tensor) -> LayerRecord:
    a_size, b_size, dst_size = context.slot_sizes()
    return LayerRecord(
        layer=context.layer,
        split=policy.split_kind(context.layer),
        threshold=policy.threshold(context.layer),
        similarity=context.matches.similarity.detach(),
        selected=(selected & context.split.a_ok).detach(),
        a_size=a_size,
        b_size=b_size,
        dst_size=dst_size,
    )
