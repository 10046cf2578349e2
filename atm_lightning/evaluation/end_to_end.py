"""Throughput of the evaluation loop as users run it: decoding, DataLoader workers, threads.

``atm benchmark --end-to-end`` times what ``atm validate`` does per batch (JPEG decoding and the
eval transform in DataLoader workers, the forward, the merge statistics) as wall time over the
whole image set, with the workers and intra-op threads ``atm validate`` would use by default
(:mod:`atm_lightning.threads`). Methods take turns pass by pass, so that drift affects all alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import ImageListDataset
from ..data.imagenet import default_num_workers
from ..data.transforms import eval_transform, resolve_eval_config
from ..patch import merge_stats
from .options import Method
from .timing import Measurement, Row, mean_gflops, merge_step, to_row, use


def end_to_end(
    model: nn.Module,
    model_name: str,
    paths: Sequence[Path],
    methods: list[Method],
    batch_size: int,
    runs: int,
    workers: int | None = None,
    compile: bool = False,
) -> list[Row]:
    """Rows for ``methods`` (``methods[0]`` dense) at ``batch_size``: img/s of whole passes over ``paths``.

    One untimed pass per method first (worker start-up, caches, compilation); FLOPs come from
    the same images through the same transform.
    """
    workers = default_num_workers() if workers is None else workers
    dataset = ImageListDataset([(path, 0) for path in paths], eval_transform(resolve_eval_config(model_name)))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)
    batches = [images for images, _ in loader]
    flops = [mean_gflops(model, method, batches) for method in methods]
    for method in methods:
        timed_loop(model, method, loader, compile)
    steps = [merge_step(model, method, batches[0], compile) for method in methods]
    seconds = [[0.0] * runs for _ in methods]
    for run in range(runs):
        for method, times in zip(methods, seconds):
            times[run] = timed_loop(model, method, loader, compile)
    results = [
        Measurement(len(paths) / statistics.median(s), gflops, dense, None, tuple(s), step)
        for s, (gflops, dense), step in zip(seconds, flops, steps)
    ]
    return [to_row(method, batch_size, result, results[0]) for method, result in zip(methods, results)]


def timed_loop(model: nn.Module, method: Method, loader: DataLoader, compile: bool) -> float:
    """Wall seconds of one evaluation pass: loading, forward and (merging methods) merge statistics."""
    forward = use(model, method, compile)
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            forward(images)
            if not method.dense:
                merge_stats(model)
    return time.perf_counter() - start
