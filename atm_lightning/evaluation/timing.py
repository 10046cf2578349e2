"""Timing merged forwards against dense ones: methods take turns batch by batch on cached images.

:func:`benchmark` measures FLOPs and peak memory first, then times ``runs`` passes in which every
batch runs under every method before the next batch, so that a machine whose speed drifts
(shared VMs do, by 10% within a minute) affects all methods alike.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..patch import merge_stats, patch, unpatch
from .memory import peak_memory_mb
from .options import Method, parse_method


@dataclass(frozen=True)
class Row:
    """One method at one batch size; ratios are against dense at the same batch size."""

    method: str
    batch_size: int
    img_per_s: float
    speedup: float  # img/s over dense img/s
    gflops: float  # mean analytic GFLOPs (multiply-adds) per image, matching cost excluded
    flops_ratio: float  # dense GFLOPs / method GFLOPs: the speed-up the FLOPs promise
    realised: float  # speedup / flops_ratio: how much of that promise the hardware delivers
    peak_mem_mb: float | None  # rise above the level before one pass (see memory_note)
    realised_min: float | None = None  # lowest and highest realised fraction of single runs,
    realised_max: float | None = None  # each against dense in the same run (batches interleaved)
    merge_step: str = "-"  # how the merge steps ran: fused (the CPU kernel) or batched; "-" for dense


@dataclass(frozen=True)
class Measurement:
    """What :func:`benchmark` measured for one method, before comparing with dense."""

    img_per_s: float
    gflops: float
    gflops_dense: float
    peak_mem_mb: float | None
    seconds: tuple[float, ...] = ()  # per run
    merge_step: str = "-"  # see Row


def with_dense(methods: list[Method]) -> list[Method]:
    """Speed-ups need the dense baseline: put it first, adding it when not asked for."""
    dense = [m for m in methods if m.dense] or [parse_method("dense")]
    return dense[:1] + [m for m in methods if not m.dense]


def benchmark(
    model: nn.Module,
    images: Tensor,
    methods: list[Method],
    batch_sizes: list[int],
    warmup: int,
    runs: int,
    before_timing: Callable[[], object] | None = None,
    compile: bool = False,
) -> list[Row]:
    """Measure every method at every batch size; ``methods[0]`` is the dense baseline.

    FLOPs and memory are measured first for all batch sizes, then ``before_timing`` runs (the
    allocator setting of ``--malloc``, which would distort memory), then the timed passes.
    With ``compile`` every method runs under ``torch.compile`` (dense: the whole timm model;
    merging: see ``patch(compile=True)``), and the warm-up is at least one pass over all batches,
    so that every shape is compiled before timing.
    """
    all_batches = [list(images.split(batch_size)) for batch_size in batch_sizes]
    flops = [[mean_gflops(model, method, batches) for method in methods] for batches in all_batches]
    memory = [
        [warm_up_then_peak_memory(model, m, batches, max(warmup, len(batches)) if compile or m.compile else warmup, compile)
         for m in methods]
        for batches in all_batches
    ]  # fmt: skip
    steps = [[merge_step(model, m, batches[0], compile) for m in methods] for batches in all_batches]
    if before_timing is not None:
        before_timing()
    rows = []
    for batch_size, batches, size_flops, size_memory, size_steps in zip(batch_sizes, all_batches, flops, memory, steps):
        seconds = interleaved_runs(model, methods, batches, runs, compile)
        num_images = sum(len(b) for b in batches)
        results = [
            Measurement(num_images / statistics.median(s), gflops, dense, peak, tuple(s), step)
            for s, (gflops, dense), peak, step in zip(seconds, size_flops, size_memory, size_steps)
        ]
        rows += [to_row(method, batch_size, result, results[0]) for method, result in zip(methods, results)]
    unpatch(model)
    return rows


_COMPILED_DENSE: weakref.WeakKeyDictionary[nn.Module, Callable[[Tensor], Tensor]] = weakref.WeakKeyDictionary()


def use(model: nn.Module, method: Method, compile: bool = False) -> Callable[[Tensor], Tensor]:
    """Set the model up to run ``method`` and return what to call; dense runs timm's own forward,
    without accounting hooks (with ``compile``, ``torch.compile`` of the whole model)."""
    compile = compile or method.compile
    if not method.dense:
        return patch(model, method.merger, compile=compile, fused=method.fused, attention=method.attention)
    unpatch(model)
    if not compile:
        return model
    if model not in _COMPILED_DENSE:
        _COMPILED_DENSE[model] = torch.compile(model)
    return _COMPILED_DENSE[model]


def mean_gflops(model: nn.Module, method: Method, batches: list[Tensor]) -> tuple[float, float]:
    """Mean per-image GFLOPs of ``method`` over the batches, and the dense model's GFLOPs."""
    patch(model, method.merger, fused=False, attention=method.attention)
    total = 0.0
    with torch.inference_mode():
        for batch in batches:
            model(batch)
            total += float(merge_stats(model).gflops.sum())
    return total / sum(len(b) for b in batches), merge_stats(model).gflops_dense


def merge_step(model: nn.Module, method: Method, batch: Tensor, compile: bool = False) -> str:
    """How ``method``'s merge steps run on ``batch``: ``fused`` or ``batched`` (``-`` for dense)."""
    if method.dense:
        return "-"
    forward = use(model, method, compile)
    with torch.inference_mode():
        forward(batch)
    return "fused" if merge_stats(model).fused else "batched"


def warm_up_then_peak_memory(
    model: nn.Module, method: Method, batches: list[Tensor], warmup: int, compile: bool = False
) -> float | None:
    """Run ``warmup`` batches, then one pass measuring peak memory (see :func:`peak_memory_mb`)."""
    forward = use(model, method, compile)
    with torch.inference_mode():
        for i in range(warmup):
            forward(batches[i % len(batches)])
        return peak_memory_mb(lambda: timed_pass(forward, batches), batches[0].device)


def interleaved_runs(
    model: nn.Module, methods: list[Method], batches: list[Tensor], runs: int, compile: bool = False
) -> list[list[float]]:
    """Seconds per pass, ``runs`` per method. Methods take turns batch by batch, so that a
    machine whose speed drifts (shared VMs do, by 10% within a minute) affects all alike."""
    seconds: list[list[float]] = [[0.0] * runs for _ in methods]
    with torch.inference_mode():
        for run in range(runs):
            for batch in batches:
                for method, times in zip(methods, seconds):
                    times[run] += timed_forward(use(model, method, compile), batch)
    return seconds


def timed_pass(forward: Callable[[Tensor], Tensor], batches: list[Tensor]) -> float:
    """Seconds for one forward over every batch."""
    return sum(timed_forward(forward, batch) for batch in batches)


def timed_forward(model: Callable[[Tensor], Tensor], batch: Tensor) -> float:
    """Seconds for one forward (CUDA synchronised at both ends)."""
    synchronize(batch.device)
    start = time.perf_counter()
    model(batch)
    synchronize(batch.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_row(method: Method, batch_size: int, result: Measurement, dense: Measurement) -> Row:
    speedup = result.img_per_s / dense.img_per_s
    flops_ratio = result.gflops_dense / result.gflops
    per_run = [d / t / flops_ratio for d, t in zip(dense.seconds, result.seconds)]
    return Row(
        method=method.label,
        batch_size=batch_size,
        img_per_s=result.img_per_s,
        speedup=speedup,
        gflops=result.gflops,
        flops_ratio=flops_ratio,
        realised=speedup / flops_ratio,
        peak_mem_mb=result.peak_mem_mb,
        realised_min=min(per_run, default=None),
        realised_max=max(per_run, default=None),
        merge_step=result.merge_step,
    )
