"""The attention kernels a padded batch of merged tokens can run on: SDPA and FlexAttention.

After merging, a batch's images hold different numbers of tokens; the patch attends them padded
to the widest, with ``log(size)`` and ``-inf`` on padding in one additive mask
(``atm_lightning/patch/attention.py``). This measures each kernel (``patch(..., attention=...)``)
on such batches, taking turns call by call, and checks that they agree.

Example (ViT-Ti attention: 3 heads of 64; ``--device cuda`` on a machine with a GPU):
    python tools/attention_kernels.py --batch 64 --lengths 197 150 90 45
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from atm_lightning.evaluation.options import HelpFormatter, run_cli
from atm_lightning.patch.attention import ATTENTION_KERNELS, attend, attention_bias


@dataclass(frozen=True)
class KernelRow:
    length: int
    ms: dict[str, float]  # median milliseconds per call, by kernel
    max_abs_diff: float  # largest difference of any kernel's output from SDPA's


def batch_inputs(
    batch: int, length: int, heads: int, head_dim: int, device: torch.device, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v [B, H, L, d] and the additive mask [B, 1, 1, L] of a padded merged batch: the first
    image holds ``length`` tokens, the others 60-100% of it, sizes 1-4 (log(size) in the mask)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, batch, heads, length, head_dim, generator=g).to(device).unbind(0)
    count = torch.randint(max(1, int(0.6 * length)), length + 1, (batch,), generator=g)
    count[0] = length
    size = torch.randint(1, 5, (batch, length), generator=g).float() * (torch.arange(length) < count[:, None])
    return q, k, v, attention_bias(size.to(device), True, torch.float32)


def median_seconds(calls: dict[str, Callable[[], Tensor]], seconds: float, device: torch.device) -> dict[str, float]:
    """Median time of each call; they take turns so drift of the machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up (FlexAttention compiles here)
        call()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or min(len(t) for t in times.values()) < 5:
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(args: argparse.Namespace) -> list[KernelRow]:
    device = torch.device(args.device)
    rows = []
    with torch.inference_mode():
        for length in args.lengths:
            q, k, v, bias = batch_inputs(args.batch, length, args.heads, args.head_dim, device)
            calls = {kernel: partial(attend, q, k, v, bias, 0.0, kernel) for kernel in args.kernels}
            reference = attend(q, k, v, bias, 0.0, "sdpa")
            diff = max((calls[kernel]() - reference).abs().max().item() for kernel in args.kernels)
            rows.append(KernelRow(length, {n: s * 1e3 for n, s in median_seconds(calls, args.seconds, device).items()}, diff))
    return rows


def markdown_table(rows: list[KernelRow], kernels: list[str]) -> str:
    lines = ["| tokens | " + " | ".join(f"{k} ms" for k in kernels) + " | max abs diff |", "|---:|" + "---:|" * (len(kernels) + 1)]
    for r in rows:
        lines.append(f"| {r.length} | " + " | ".join(f"{r.ms[k]:.2f}" for k in kernels) + f" | {r.max_abs_diff:.1e} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[197, 150, 90, 45])
    parser.add_argument("--batch", type=int, default=64, help="images per padded batch")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kernels", nargs="+", default=list(ATTENTION_KERNELS), choices=ATTENTION_KERNELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seconds", type=float, default=1.5, help="timing budget per length")
    return parser


def main(args: argparse.Namespace) -> list[KernelRow]:
    for name in ("lengths", "batch", "heads", "head_dim", "threads"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {values}")
    torch.set_num_threads(args.threads)
    rows = measure(args)
    print(f"{args.batch} images x {args.heads} heads x {args.head_dim} dims, {args.device}, {args.threads} threads")
    print(markdown_table(rows, args.kernels))
    return rows


if __name__ == "__main__":
    run_cli(build_parser(), main)
