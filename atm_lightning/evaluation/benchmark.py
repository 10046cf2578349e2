"""Throughput of dense, ToMe and ATM on real images, next to what their FLOPs promise.

ATM merges by similarity threshold, so how much it saves depends on the images: the benchmark
always runs on a fixed set of real photos (random noise merges almost nothing and is refused).
The images are decoded once and the batches built in advance, so only model forwards are timed.
Each run passes over the whole image set; the median run gives images per second.

Example (ViT-Ti weights, an ImageNet val folder):
    atm benchmark --weights vit_tiny_patch16_224.safetensors --data-root IMAGENET/val --num-images 64 \\
        --batch-sizes 1 32 --methods dense tome:r=13 configs/vit_t_atm.yaml --output bench.csv
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.imagenet import default_num_workers
from ..runs import check_new_file
from ..threads import set_threads
from ..data.images import check_not_noise, evenly_spaced, image_paths, load_images
from .memory import MALLOC_MODES, keep_freed_memory, memory_note
from .options import METHOD_HELP, HelpFormatter, add_model_args, load_model, parse_method, weights_label, write_csv
from .end_to_end import end_to_end
from .timing import Row, benchmark, with_dense


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atm benchmark", description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    add = parser.add_argument
    add("--data-root", type=Path, required=True, metavar="DIR",
        help="folder of real images, searched recursively (e.g. ImageNet val/)")
    add("--num-images", type=int, default=64, help="images taken evenly spaced from the sorted folder, cached once")
    add("--methods", nargs="+", default=["dense", "tome:r=13"], metavar="METHOD",
        help=f"methods to compare, each {METHOD_HELP}; dense is added first when missing")
    add("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="N",
        help="batch sizes to measure (with ATM's batch_rule=min the savings also depend on them)")
    add("--warmup", type=int, default=3, help="untimed warm-up batches per method and batch size")
    add("--runs", type=int, default=5, help="timed passes over all images; the median is reported")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--threads", type=int, metavar="N",
        help="torch CPU threads; default: every core this process may use (cached images need no workers)")
    add("--malloc", choices=MALLOC_MODES, default="keep",
        help="keep: glibc reuses freed memory instead of returning it to the OS (mallopt M_MMAP_MAX=0, "
        "M_TRIM_THRESHOLD=2 GiB), so CPU passes time the model, not page faults (which cost dense ViT-Ti "
        "a quarter of its time on a 2-core VM); default: the allocator as configured")
    add("--compile", action="store_true",
        help="run every method under torch.compile: dense compiles the whole model, ToMe/ATM their "
        "blocks, merge step included; one untimed pass per method compiles every shape first")
    add("--end-to-end", action="store_true",
        help="time whole evaluation passes as atm validate runs them (decoding in DataLoader workers, forward, "
        "merge statistics) with its default workers and threads, instead of forwards on cached images (CPU only)")
    add("--output", type=Path, metavar="FILE", help="also write the rows to a .csv or .json file")
    add("--overwrite", action="store_true", help="replace --output if it exists")
    return parser  # fmt: skip


def main(args: argparse.Namespace) -> list[Row]:
    check_args(args)
    busy = busy_cpu_note()
    device = resolve_device(args.device)
    workers = default_num_workers() if args.end_to_end else 0
    args.threads = set_threads(args.threads, workers=workers)
    methods = with_dense([parse_method(spec) for spec in args.methods])
    paths = evenly_spaced(image_paths([args.data_root]), args.num_images)
    check_not_noise(paths)
    model = load_model(args, device)
    if args.end_to_end:
        rows = [
            row for batch_size in args.batch_sizes
            for row in end_to_end(model, args.model, paths, methods, batch_size, args.runs, workers, args.compile)
        ]  # fmt: skip
    else:
        images, _ = load_images(paths, args.model)
        keep = device.type == "cpu" and args.malloc == "keep"
        before_timing = (lambda: keep_freed_memory() or print("mallopt unavailable: --malloc keep ignored")) if keep else None
        rows = benchmark(
            model, images.to(device), methods, args.batch_sizes, args.warmup, args.runs, before_timing, args.compile
        )
    print(header(args, device, len(paths), workers) + busy)
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
    if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ValueError("--runs and --threads must be >= 1 and --warmup >= 0")
    if args.end_to_end and args.device != "cpu":
        raise ValueError("--end-to-end times the CPU evaluation loop; use --device cpu")
    if args.output is not None:
        if args.output.suffix not in (".csv", ".json"):
            raise ValueError(f"--output {args.output} must end in .csv or .json")
        check_new_file(args.output, args.overwrite, example="benchmark.csv", flag="--overwrite")


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")
    return device

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


def header(args: argparse.Namespace, device: torch.device, num_images: int, workers: int = 0) -> str:
    weights = weights_label(args)
    if args.end_to_end:
        timed = (
            f"img/s: median of {args.runs} whole evaluation passes (decoding in {workers} DataLoader workers, "
            "forward, merge statistics; methods take turns pass by pass) after one untimed pass each"
        )
    else:
        timed = (
            f"img/s: median of {args.runs} passes over all images (methods take turns batch by batch), after "
            f"{args.warmup} warm-up batches; malloc: {args.malloc}"
        )
    compiled = "; torch.compile: dense whole model, merging methods their blocks (merge step included)"
    lines = [
        (
            f"model {args.model} ({weights}) on {device}, {torch.get_num_threads()} threads; "
            f"{num_images} images from {args.data_root}"
        ),
        timed + "; dense is timm's unpatched forward" + (compiled if args.compile else ""),
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
        "| method | merge step | batch | img/s | speed-up | GFLOPs | FLOPs ratio | realised | peak mem (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = "n/a" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        spread = ""
        if r.realised_min is not None and r.realised_max is not None and r.realised_min != r.realised_max:
            spread = f" ({r.realised_min:.0%}-{r.realised_max:.0%})"
        lines.append(
            f"| {r.method} | {r.merge_step} | {r.batch_size} | {r.img_per_s:.1f} | {r.speedup:.2f}x | {r.gflops:.3f} | "
            f"{r.flops_ratio:.2f}x | {r.realised:.0%}{spread} | {memory} |"
        )
    return "\n".join(lines)


def write_rows(rows: list[Row], path: Path, settings: dict) -> None:
    """CSV: one line per row. JSON: the rows with the settings that produced them."""
    if path.suffix == ".csv":
        write_csv(rows, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
    path.write_text(json.dumps({"settings": plain, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


def cli(argv: list[str] | None = None) -> list[Row]:
    """``atm benchmark ARGS`` (``atm`` reports a mistake found after parsing in one line, see
    :mod:`atm_lightning.user_errors`)."""
    return main(build_parser().parse_args(argv))
