"""What a patched model records about its last forward pass, and what it reports from that."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..flops import to_gflops
from .state import TokenState


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

    def reordered(self, order: Callable[[Tensor], Tensor]) -> LayerRecord:
        """The record with ``order`` applied to every per-image tensor."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: order(v) for k, v in tensors.items() if isinstance(v, Tensor)})


@dataclass(frozen=True)
class MergeTrace:
    """Record of the last forward pass of a patched model, images in input order."""

    tokens: Tensor  # [B, depth+1] long: tokens entering each block, then after the last
    size: Tensor | None  # [B, N] final token sizes (None: nothing merged)
    source: Tensor | None  # [B, N, T0] final token sources (with trace_source)
    matching_macs: Tensor  # [B] cost of similarity computations
    layers: list[LayerRecord] = field(default_factory=list)
    sources: list[Tensor] = field(default_factory=list)  # source after each block (trace_source)
    rerun: Tensor | None = None  # [B] bool: ran again unmerged (rerun_margin); None: nothing was
    prefix_only: int = 0  # > 0: the last block computed only this many prefix tokens
    resume_layer: int | None = None  # block whose merge step first merged (a rerun resumes there); None: none did
    input_tokens: int = 0  # tokens entering the first block (what the dense model runs on), even for an empty batch
    fused: bool = False  # the merge steps ran the compiled kernel (patch's ``fused``)


class TraceRecorder:
    """Collects a :class:`MergeTrace` while the block loop runs, putting images back in input order."""

    def __init__(self, state: TokenState, first: int = 0) -> None:
        """``first`` > 0: the run starts inside that block (a rerun), with ``state``'s tokens
        having entered every block before."""
        self.tokens = [state.count] * (first + 1)
        self.input_tokens = state.x.shape[1]  # a starting state is always padded: [B, N, C]
        self.fused = False  # set by the block loop when its merge steps run the compiled kernel
        self.resume_layer: int | None = None
        self.matching = torch.zeros(state.count.shape, device=state.count.device, dtype=torch.float64)
        self.layers: list[LayerRecord] = []
        self.sources: list[Tensor] = []

    def merge_step(self, state: TokenState, matching_macs: Tensor, record: LayerRecord | None) -> None:
        """A merge step's cost and decisions, per image of ``state`` (the state it started from)."""
        self.matching += state.in_input_order(matching_macs)
        if record is not None:
            self.layers.append(record.reordered(state.in_input_order))

    def block_done(self, state: TokenState) -> None:
        self.tokens.append(state.in_input_order(state.count))
        if state.source is not None:
            self.sources.append(state.in_input_order(state.source))

    def finish(self, state: TokenState, prefix_only: int = 0) -> MergeTrace:
        size, source = state.in_input_order(state.size), state.in_input_order(state.source)
        tokens = torch.stack(self.tokens, dim=1)
        return MergeTrace(
            tokens, size, source, self.matching, self.layers, self.sources, prefix_only=prefix_only,
            resume_layer=self.resume_layer, input_tokens=self.input_tokens, fused=self.fused,
        )


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
    fused: bool = False  # the merge steps ran the compiled kernel (patch's ``fused``), not the eager step
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
    if trace.resume_layer is not None:  # a rerun resumes where the batch first merged, with the same last block
        rerun_macs = cost.resumed_macs(trace.input_tokens, trace.resume_layer, trace.prefix_only)
    macs = cost.image_macs(trace.tokens, trace.prefix_only)
    if trace.rerun is not None:
        macs = macs + trace.rerun.to(macs.dtype) * rerun_macs
    return MergeStats(
        tokens=trace.tokens,
        gflops=to_gflops(macs),
        gflops_dense=to_gflops(dense_macs),
        gflops_matching=to_gflops(trace.matching_macs),
        size=trace.size,
        source=trace.source,
        layers=trace.layers,
        sources=trace.sources,
        rerun=trace.rerun,
        gflops_rerun=to_gflops(rerun_macs),
        fused=trace.fused,
        prefix_only=trace.prefix_only,
    )
