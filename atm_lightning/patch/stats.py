"""What a patched model records about its last forward pass, and what it reports from that.

A forward records as little as it can: the token count of every block (a reference to a tensor
it has anyway, or one int when no image is padded), which blocks ran a merge step and how wide
their keys were, and the states an unmerged rerun may start from. Token tables, FLOPs and the
rerun's starting block are worked out from those afterwards, when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..flops import ViTCost, to_gflops
from ..merge import LayerRecord, MatchingPolicy, TokenMerger, TokenState


class StepInfo(NamedTuple):
    """A merge step's matching work, counted from the tokens that entered its block."""

    layer: int
    kind: str  # "alternate" or "size" (matching), "prune" (class attention only)
    width: int  # width of the compared keys
    class_attention: bool  # the step also read the class token's attention


@dataclass(frozen=True)
class Resume:
    """Where an unmerged rerun may pick up: the batch's tokens after block ``layer``'s attention,
    before its merge step. Up to the first block that merged anything, every block ran as the
    unmerged model, so a rerun starts there with that block's MLP instead of the patch embedding."""

    layer: int
    tokens: TokenState  # unmerged: padded [B, N, C], input order


@dataclass(frozen=True)
class MergeTrace:
    """Record of the last forward pass of a patched model."""

    counts: tuple[Tensor | int, ...]  # tokens that may merge entering each block, then after the last: [B] or one int
    batch: int
    protected: int  # tokens never merged, on top of ``counts``
    size: Tensor | None  # [B, W] final token sizes (None: nothing merged)
    source: Tensor | None  # [B, W, T0] final token sources (with trace_source)
    steps: tuple[StepInfo, ...] = ()
    layers: list[LayerRecord] = field(default_factory=list)
    sources: list[Tensor] = field(default_factory=list)  # source after each block (trace_source)
    rerun: Tensor | None = None  # [B] bool: ran again unmerged (rerun_margin); None: nothing was
    prefix_only: int = 0  # > 0: the last block computed only this many prefix tokens
    input_tokens: int = 0  # tokens entering the first block (what the dense model runs on), even for an empty batch
    fused: bool = False  # the merge steps ran the compiled kernel (patch's ``fused``)
    device: torch.device | None = None

    @cached_property
    def tokens(self) -> Tensor:
        """[B, depth+1] long: tokens entering each block, then after the last."""
        columns = [c if isinstance(c, Tensor) else torch.full((self.batch,), c, dtype=torch.long, device=self.device)
                   for c in self.counts]  # fmt: skip
        return torch.stack(columns, dim=1) + self.protected

    @cached_property
    def resume_layer(self) -> int | None:
        """The first block whose merge step merged anything (a rerun resumes there); None: none did."""
        tokens = self.tokens
        for info in self.steps:
            if bool((tokens[:, info.layer + 1] < tokens[:, info.layer]).any()):
                return info.layer
        return None


class TraceRecorder:
    """Collects a :class:`MergeTrace` while the block loop runs."""

    def __init__(self, tokens: TokenState, first: int, fused: bool, keep_resume: bool, cost: ViTCost) -> None:
        """``first`` > 0: the run starts inside that block (a rerun), with ``tokens`` having entered
        every block before. ``keep_resume``: keep where an unmerged rerun could start."""
        self.attn_width, self.head_dim = cost.attn_width, cost.head_dim
        self.counts: list[Tensor | int] = [tokens.free] * (first + 1)
        self.batch, self.protected = tokens.batch, tokens.protected
        self.input_tokens = tokens.width  # a starting state is never packed: [B, N, C]
        self.fused = fused
        self.steps: list[StepInfo] = []
        self.layers: list[LayerRecord] = []
        self.sources: list[Tensor] = []
        self.resume: list[Resume] | None = [] if keep_resume else None
        self.device = tokens.x.device

    def step(self, layer: int, policy: TokenMerger, tokens: TokenState, record: LayerRecord | None) -> None:
        """Block ``layer``'s merge step, on ``tokens`` (after its attention): its work, its
        decisions, and a rerun's start while nothing merged yet (known for sure once a step left
        the batch narrower)."""
        if self.resume is not None and tokens.width == self.input_tokens and tokens.real_rows is None:
            self.resume.append(Resume(layer, tokens))
        if isinstance(policy, MatchingPolicy):
            width = self.attn_width if policy.key_form == "per_head" else self.head_dim
            self.steps.append(StepInfo(layer, policy.split_kind(layer), width, policy.needs_class_attention))
        else:
            self.steps.append(StepInfo(layer, "prune", 0, True))
        if record is not None:
            self.layers.append(record)

    def block_done(self, tokens: TokenState) -> None:
        self.counts.append(tokens.free)
        if tokens.source is not None:
            self.sources.append(tokens.source)

    def finish(self, tokens: TokenState, prefix_only: int = 0) -> tuple[MergeTrace, list[Resume] | None]:
        """The trace of the run, and where a rerun could start (None: it keeps none)."""
        if prefix_only:  # the last block computed only the prefix tokens
            self.counts.append(prefix_only - self.protected)
        trace = MergeTrace(
            tuple(self.counts), self.batch, self.protected, tokens.size, tokens.source, tuple(self.steps), self.layers,
            self.sources, prefix_only=prefix_only, input_tokens=self.input_tokens, fused=self.fused,
            device=self.device,
        )  # fmt: skip
        return trace, self.resume


@dataclass(frozen=True)
class MergeStats:
    """Token counts and FLOPs of each image of the last forward (padding never counted)."""

    tokens: Tensor  # [B, depth+1] long: tokens entering each block, then after the last
    gflops: Tensor  # [B] float64 analytic GFLOPs (multiply-adds) of each image
    gflops_dense: float  # the same model without merging
    gflops_matching: Tensor  # [B] similarity computations, reported apart as in the papers
    size: Tensor | None  # [B, N] final token sizes, 0 = padding (None when nothing merged)
    source: Tensor | None  # [B, N, T0] which input tokens each final token holds (trace_source)
    layers: list[LayerRecord]  # per-block decisions (record_merges=True only)
    sources: list[Tensor]  # [B, N_l, T0] after each block (trace_source=True only)
    rerun: Tensor | None = None  # [B] bool: images run again unmerged, counted in gflops (rerun_margin)
    gflops_rerun: float = 0.0  # what an image's unmerged rerun adds to its gflops (0: nothing merged, no rerun)
    fused: bool = False  # the merge steps ran the compiled kernel (patch's ``fused``), not the batched step
    prefix_only: int = 0  # > 0: the last block computed only this many prefix tokens

    @property
    def final_tokens(self) -> Tensor:
        """[B] the tokens each image ended with: after the last block, or entering it where that
        block computed the prefix tokens alone (``last_block_prefix_only``)."""
        return self.tokens[:, -2] if self.prefix_only else self.tokens[:, -1]

    @property
    def flops_reduction(self) -> Tensor:
        """Fraction of dense GFLOPs saved, per image."""
        return 1.0 - self.gflops / self.gflops_dense


def matching_macs(cost: ViTCost, trace: MergeTrace, protected: int) -> Tensor:
    """[B] multiply-adds of every merge step's matching (similarities, and the class token's
    attention where a step read it), from the tokens that entered each step's block."""
    tokens = trace.tokens.double()
    total = torch.zeros(trace.batch, dtype=torch.float64, device=tokens.device)
    for info in trace.steps:
        n = tokens[:, info.layer]
        if info.kind != "prune":
            num_a = _num_sources(info.kind, n, protected)
            total += cost.matching_macs(num_a, n - protected - num_a, info.width)
        if info.class_attention:
            total += cost.class_attention_macs(n)
    return total


def _num_sources(kind: str, n: Tensor, protected: int) -> Tensor:
    """How many of ``n`` tokens the split makes sources (as :mod:`atm_lightning.merge.matching`)."""
    if kind == "size":
        return torch.div(n - protected + 1, 2, rounding_mode="floor")
    first = protected + protected % 2  # even positions past the protected
    return torch.div(n - first + 1, 2, rounding_mode="floor").clamp_min(0)


def merge_stats(model: nn.Module) -> MergeStats:
    """Statistics of the last forward of a model patched with :func:`atm_lightning.patch`."""
    merging = getattr(model, "_merging", None)
    if merging is None:
        raise TypeError("merge_stats needs a patched model: call atm_lightning.patch(model, ...) first")
    trace = merging.last
    if trace is None:
        raise ValueError("no forward pass since the model was patched: run model(images) first")
    cost = merging.cost
    dense_macs = cost.dense_macs(trace.input_tokens)
    rerun_macs = 0.0  # nothing merged: the output is the dense one already
    if trace.resume_layer is not None:  # a rerun resumes where the batch first merged
        rerun_macs = cost.resumed_macs(trace.input_tokens, trace.resume_layer, trace.prefix_only)
    macs = cost.image_macs(trace.tokens, trace.prefix_only)
    if trace.rerun is not None:
        macs = macs + trace.rerun.to(macs.dtype) * rerun_macs
    return MergeStats(
        tokens=trace.tokens,
        gflops=to_gflops(macs),
        gflops_dense=to_gflops(dense_macs),
        gflops_matching=to_gflops(matching_macs(cost, trace, merging.num_protected)),
        size=trace.size,
        source=trace.source,
        layers=trace.layers,
        sources=trace.sources,
        rerun=trace.rerun,
        gflops_rerun=to_gflops(rerun_macs),
        fused=trace.fused,
        prefix_only=trace.prefix_only,
    )
