"""What a patched model reports about its last forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..flops import to_gflops
from .timm_vit import LayerRecord, TokenMergingMixin


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

    @property
    def flops_reduction(self) -> Tensor:
        """Fraction of dense GFLOPs saved, per image."""
        return 1.0 - self.gflops / self.gflops_dense


def merge_stats(model: nn.Module) -> MergeStats:
    """Statistics of the last forward of a model patched with :func:`atm_lightning.patch`."""
    if not isinstance(model, TokenMergingMixin):
        raise TypeError("merge_stats needs a patched model: call atm_lightning.patch(model, ...) first")
    trace = model._merge_trace
    if trace is None:
        raise ValueError("no forward pass since the model was patched: run model(images) first")
    cost = model._merge_cost
    return MergeStats(
        tokens=trace.tokens,
        gflops=to_gflops(cost.image_macs(trace.tokens)),
        gflops_dense=to_gflops(cost.dense_macs(int(trace.tokens[0, 0]))),
        gflops_matching=to_gflops(trace.matching_macs),
        size=trace.size,
        source=trace.source,
        layers=trace.layers,
        sources=trace.sources,
    )
