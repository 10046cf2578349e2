"""The checks to run on a machine with a GPU: merges as on the CPU, speed, and kernel launches.

1. The same images through dense, ToMe and ATM on the CPU and on the device: top-1 agreement,
   the largest logit difference, and images whose token counts differ (a similarity within float
   rounding of its threshold may tip either way on different hardware).
2. For each model (ViT-Ti/S/B by default; random weights unless ``--weights`` names the first
   model's): img/s of dense, ToMe and ATM at each batch size, methods taking turns batch by
   batch (:mod:`atm_lightning.evaluation.timing`), next to what their FLOPs promise.
3. Kernel launches per forward at each batch size (``torch.profiler`` on a GPU, ATen operations
   on a CPU: :mod:`atm_lightning.evaluation.launches`).

    python tools/gpu_check.py --device cuda --weights vit_tiny.safetensors --data-root IMAGENET/val \\
        --output gpu_check.md

It prints the three tables and writes them to ``--output``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from atm_lightning.data.images import check_not_noise, evenly_spaced, image_paths, load_images
from atm_lightning.evaluation.benchmark import resolve_device
from atm_lightning.evaluation.launches import launches_per_forward
from atm_lightning.evaluation.options import HelpFormatter, Method, parse_method, run_cli
from atm_lightning.evaluation.timing import Row, benchmark, use, with_dense
from atm_lightning.models import create_model
from atm_lightning.patch import merge_stats, unpatch

REPO = Path(__file__).resolve().parents[1]
MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
METHODS = ["dense", "tome:r=13", str(REPO / "configs" / "vit_t_atm.yaml")]


def outputs(model: nn.Module, method: Method, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (on the CPU) and tokens per block of ``method`` over ``images``."""
    forward = use(model, method)
    logits, tokens = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            logits.append(forward(images[start : start + batch]).float().cpu())
            if not method.dense:
                tokens.append(merge_stats(model).tokens.cpu())
    return torch.cat(logits), torch.cat(tokens) if tokens else torch.zeros(0)


def agreement_table(model: nn.Module, methods: list[Method], images: torch.Tensor, device: torch.device, batch: int) -> str:
    lines = ["| method | top-1 agreement | max abs logit diff | images with other token counts |", "|---|---:|---:|---:|"]
    for method in methods:
        cpu_logits, cpu_tokens = outputs(model.cpu(), method, images, batch)
        dev_logits, dev_tokens = outputs(model.to(device), method, images.to(device), batch)
        agree = float((cpu_logits.argmax(-1) == dev_logits.argmax(-1)).double().mean())
        other = "-" if method.dense else str(int((cpu_tokens != dev_tokens).any(1).sum()))
        lines.append(f"| {method.label} | {agree:.1%} | {(cpu_logits - dev_logits).abs().max():.2e} | {other} |")
    unpatch(model)
    return "\n".join(lines)


def speed_table(name: str, rows: list[Row], launches: dict[tuple[str, int], int]) -> str:
    lines = [
        "| model | method | batch | img/s | speed-up | FLOPs ratio | realised | launches/forward |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {name} | {r.method} | {r.batch_size} | {r.img_per_s:.1f} | {r.speedup:.2f}x | {r.flops_ratio:.2f}x | "
            f"{r.realised:.0%} | {launches[(r.method, r.batch_size)]} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    if min(args.batch_sizes) < 1 or args.num_images < max(args.batch_sizes) or args.runs < 1:
        raise ValueError("--batch-sizes must be >= 1 and at most --num-images, --runs >= 1")
    device = resolve_device(args.device)
    methods = with_dense([parse_method(spec) for spec in args.methods])
    paths = evenly_spaced(image_paths([args.data_root]), args.num_images)
    check_not_noise(paths)
    sections = [f"# GPU check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}"]
    for i, name in enumerate(args.models):
        weights = str(args.weights) if args.weights is not None and i == 0 else None
        model = create_model(name, weights=weights, num_classes=None).eval()
        images, _ = load_images(paths, name)
        label = f"{name} ({'weights: ' + weights if weights else 'random weights'})"
        if i == 0:
            check = agreement_table(model, methods, images[: args.check_images], device, min(args.batch_sizes[-1], 64))
            sections.append(f"## CPU against {device}: {label}, {min(len(images), args.check_images)} images\n\n{check}")
        model, images = model.to(device), images.to(device)
        rows = benchmark(model, images, methods, args.batch_sizes, args.warmup, args.runs)
        launches = {
            (m.label, b): launches_per_forward(use(model, m), images[:b]) for m in methods for b in args.batch_sizes
        }
        unpatch(model)
        sections.append(f"## {label}: speed and launches\n\n{speed_table(name, rows, launches)}")
    report = "\n\n".join(sections) + "\n"
    print(report)
    if args.output is not None:
        args.output.write_text(report)
        print(f"wrote {args.output}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to check against the CPU")
    parser.add_argument("--data-root", type=Path, required=True, help="folder of real images, searched recursively")
    parser.add_argument("--weights", type=Path, help="local weights of the first model (the others use random weights)")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--num-images", type=int, default=256, help="images timed (at least the largest batch)")
    parser.add_argument("--check-images", type=int, default=256, help="images compared between CPU and device")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, help="also write the report (markdown) here")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), main)
