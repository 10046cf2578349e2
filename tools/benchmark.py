"""Throughput of dense, ToMe and ATM on real images, next to what their FLOPs promise.

ATM merges by similarity threshold, so how much it saves depends on the images: the benchmark
always runs on a fixed set of real photos (random noise merges almost nothing and is refused).
The images are decoded once and the batches built in advance, so only model forwards are timed.
Each run passes over the whole image set; the median run gives images per second.

Example (2 CPU cores, shared ViT-Ti weights):
    python tools/benchmark.py --weights ../shared/data/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \\
        --data-root ../shared/data/imagenet-sample/val --num-images 64 --batch-sizes 1 32 \\
        --methods dense tome:r=13 atm:alpha=1.0,beta=0.03,theta_min=0.7,split_layer=10 --output bench.csv
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _common import (
    METHOD_HELP,
    HelpFormatter,
    Method,
    add_model_args,
    check_not_noise,
    evenly_spaced,
    image_paths,
    load_images,
    load_model,
    parse_method,
    run_cli,
)
from torch import Tensor, nn

from atm_lightning import merge_stats, patch, unpatch

_STATM = Path("/proc/self/statm")


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


@dataclass(frozen=True)
class Measurement:
    """What :func:`benchmark` measured for one method, before comparing with dense."""

    img_per_s: float
    gflops: float
    gflops_dense: float
    peak_mem_mb: float | None
    seconds: tuple[float, ...] = ()  # per run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark.py", description=__doc__, formatter_class=HelpFormatter
    )
    add_model_args(parser)
    parser.add_argument(
        "--data-root",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder of real images, searched recursively (e.g. ImageNet val/)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=64,
        help="images taken evenly spaced from the sorted folder, cached once",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "tome:r=13"],
        metavar="METHOD",
        help=f"methods to compare, each {METHOD_HELP}; dense is added first when missing",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 32],
        metavar="N",
        help="batch sizes to measure (with ATM's batch_rule=min the savings also depend on them)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed warm-up batches per method and batch size"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed passes over all images; the median is reported"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default="keep",
        help="keep: glibc reuses freed memory instead of returning it to the OS (mallopt M_MMAP_MAX=0, "
        "M_TRIM_THRESHOLD=2 GiB), so CPU passes time the model, not page faults (which cost dense ViT-Ti "
        "a quarter of its time on a 2-core VM); default: the allocator as configured",
    )
    parser.add_argument(
        "--output", type=Path, metavar="FILE", help="also write the rows to a .csv or .json file"
    )
    return parser


def main(args: argparse.Namespace) -> list[Row]:
    check_args(args)
    busy = busy_cpu_note()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    methods = with_dense([parse_method(spec) for spec in args.methods])
    paths = evenly_spaced(image_paths([args.data_root]), args.num_images)
    check_not_noise(paths)
    images, _ = load_images(paths, args.model)
    model = load_model(args, device)
    keep = device.type == "cpu" and args.malloc == "keep"
    before_timing = (lambda: keep_freed_memory() or print("mallopt unavailable: --malloc keep ignored")) if keep else None
    rows = benchmark(model, images.to(device), methods, args.batch_sizes, args.warmup, args.runs, before_timing)
    print(header(args, device, len(paths)) + busy)
    print(markdown_table(rows))
    if args.output is not None:
        write_rows(rows, args.output, settings=vars(args) | {"memory": memory_note(device)})
        print(f"\nwrote {args.output}")
    return rows


def check_args(args: argparse.Namespace) -> None:
    """Fail before loading anything when the numbers cannot work out."""
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    if min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    too_big = [b for b in args.batch_sizes if b > args.num_images]
    if too_big:
        raise ValueError(
            f"batch sizes {too_big} exceed --num-images {args.num_images}; lower them or raise --num-images"
        )
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        raise ValueError("--runs and --threads must be >= 1 and --warmup >= 0")
    if args.output is not None and args.output.suffix not in (".csv", ".json"):
        raise ValueError(f"--output {args.output} must end in .csv or .json")


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")
    return device


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
) -> list[Row]:
    """Measure every method at every batch size; ``methods[0]`` is the dense baseline.

    FLOPs and memory are measured first for all batch sizes, then ``before_timing`` runs (the
    allocator setting of ``--malloc``, which would distort memory), then the timed passes.
    """
    all_batches = [list(images.split(batch_size)) for batch_size in batch_sizes]
    flops = [[mean_gflops(model, method, batches) for method in methods] for batches in all_batches]
    memory = [[warm_up_then_peak_memory(model, m, batches, warmup) for m in methods] for batches in all_batches]
    if before_timing is not None:
        before_timing()
    rows = []
    for batch_size, batches, size_flops, size_memory in zip(batch_sizes, all_batches, flops, memory):
        seconds = interleaved_runs(model, methods, batches, runs)
        num_images = sum(len(b) for b in batches)
        results = [
            Measurement(num_images / statistics.median(s), gflops, dense, peak, tuple(s))
            for s, (gflops, dense), peak in zip(seconds, size_flops, size_memory)
        ]
        rows += [to_row(method, batch_size, result, results[0]) for method, result in zip(methods, results)]
    unpatch(model)
    return rows


def use(model: nn.Module, method: Method) -> None:
    """Set the model up to run ``method``; dense runs timm's own forward, without accounting hooks."""
    if method.dense:
        unpatch(model)
    else:
        patch(model, method.merger, ragged=method.ragged)


def mean_gflops(model: nn.Module, method: Method, batches: list[Tensor]) -> tuple[float, float]:
    """Mean per-image GFLOPs of ``method`` over the batches, and the dense model's GFLOPs."""
    patch(model, method.merger, ragged=method.ragged)
    total = 0.0
    with torch.inference_mode():
        for batch in batches:
            model(batch)
            total += float(merge_stats(model).gflops.sum())
    return total / sum(len(b) for b in batches), merge_stats(model).gflops_dense


def warm_up_then_peak_memory(
    model: nn.Module, method: Method, batches: list[Tensor], warmup: int
) -> float | None:
    """Run ``warmup`` batches, then one pass measuring peak memory (see :func:`peak_memory_mb`)."""
    use(model, method)
    with torch.inference_mode():
        for i in range(warmup):
            model(batches[i % len(batches)])
        return peak_memory_mb(model, batches)


def interleaved_runs(
    model: nn.Module, methods: list[Method], batches: list[Tensor], runs: int
) -> list[list[float]]:
    """Seconds per pass, ``runs`` per method. Methods take turns batch by batch, so that a
    machine whose speed drifts (shared VMs do, by 10% within a minute) affects all alike."""
    seconds: list[list[float]] = [[0.0] * runs for _ in methods]
    with torch.inference_mode():
        for run in range(runs):
            for batch in batches:
                for method, times in zip(methods, seconds):
                    use(model, method)
                    times[run] += timed_forward(model, batch)
    return seconds


def timed_pass(model: nn.Module, batches: list[Tensor]) -> float:
    """Seconds for one forward over every batch."""
    return sum(timed_forward(model, batch) for batch in batches)


def timed_forward(model: nn.Module, batch: Tensor) -> float:
    """Seconds for one forward (CUDA synchronised at both ends)."""
    synchronize(batch.device)
    start = time.perf_counter()
    model(batch)
    synchronize(batch.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(model: nn.Module, batches: list[Tensor]) -> float | None:
    """Peak memory above the level before one untimed pass, in MiB (None where unmeasurable)."""
    if batches[0].device.type == "cuda":
        return cuda_peak_mb(model, batches)
    return rss_peak_mb(model, batches) if _STATM.exists() else None


def cuda_peak_mb(model: nn.Module, batches: list[Tensor]) -> float:
    device = batches[0].device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    timed_pass(model, batches)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rss_peak_mb(model: nn.Module, batches: list[Tensor]) -> float:
    """Resident set size sampled every millisecond in a thread (may miss shorter spikes)."""
    release_freed_memory()
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        timed_pass(model, batches)
    finally:
        done.set()
        sampler.join()
    return (peak[0] - before) / 2**20


def rss_bytes() -> int:
    """Current resident set size. Unlike ``ru_maxrss``, a lifetime high-water mark that cannot
    show the peak of a method measured after a hungrier one, it can be sampled around one pass."""
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


MALLOC_MODES = ("keep", "default")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for large blocks, no trimming of the heap.

    By default glibc maps every block over 32 MiB (ViT activations at batch 64) afresh and unmaps
    it when freed, so each forward page-faults its activations in again; how much that costs
    depends on the VM, not on the model, and it would drown the differences being measured.
    Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); otherwise memory freed by the
    previous method stays resident and hides this method's peak (it read 0 MiB after dense)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise may read low
        pass


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak mem: torch.cuda.max_memory_allocated during one pass, minus memory allocated before it"
    return (
        "peak mem: CPU resident set size during one pass (/proc/self/statm sampled every 1 ms), "
        "minus RSS before it (after malloc_trim)"
    )


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
    )


def busy_cpu_note() -> str:
    """A warning when other processes already load the CPU: timings are then noisy, and with
    several threads OpenMP's spin-waiting can slow the forward many times over (try --threads 1)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < cores:
        return ""
    return (
        f"WARNING: load average {load:.1f} on {cores} cores before the benchmark started; other processes "
        "compete for the CPU, so img/s is unreliable (with several threads OpenMP spin-waits make it worse)\n"
    )


def header(args: argparse.Namespace, device: torch.device, num_images: int) -> str:
    weights = args.weights or ("timm pretrained" if args.pretrained else "random init")
    lines = [
        (
            f"model {args.model} ({weights}) on {device}, {torch.get_num_threads()} threads; "
            f"{num_images} images from {args.data_root}"
        ),
        (
            f"img/s: median of {args.runs} passes over all images (methods take turns batch by batch), after "
            f"{args.warmup} warm-up batches; dense is timm's unpatched forward; malloc: {args.malloc}"
        ),
        (
            "GFLOPs: mean analytic multiply-adds per image (merge_stats, matching excluded); "
            "FLOPs ratio = dense GFLOPs / GFLOPs; realised = speed-up / FLOPs ratio "
            "(in brackets: lowest-highest over single runs)"
        ),
        memory_note(device),
    ]
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| method | batch | img/s | speed-up | GFLOPs | FLOPs ratio | realised | peak mem (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = "n/a" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        spread = ""
        if r.realised_min is not None and r.realised_max is not None and r.realised_min != r.realised_max:
            spread = f" ({r.realised_min:.0%}-{r.realised_max:.0%})"
        lines.append(
            f"| {r.method} | {r.batch_size} | {r.img_per_s:.1f} | {r.speedup:.2f}x | {r.gflops:.3f} | "
            f"{r.flops_ratio:.2f}x | {r.realised:.0%}{spread} | {memory} |"
        )
    return "\n".join(lines)


def write_rows(rows: list[Row], path: Path, settings: dict) -> None:
    """CSV: one line per row. JSON: the rows with the settings that produced them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in rows]
    if path.suffix == ".csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
        path.write_text(json.dumps({"settings": plain, "rows": records}, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(build_parser(), main)
