"""Which attention kernel to use for a padded group of images: the fused one or three matmuls.

Packed ragged execution (``ragged="packed"``) runs attention per group of images of similar
length. On CPU, PyTorch's fused ``scaled_dot_product_attention`` splits queries into small
blocks below 192 tokens and slows down there; the patch then uses a per-head
baddbmm-softmax-bmm path (``MATMUL_ATTENTION_MAX_TOKENS`` in ``atm_lightning/patch/attention.py``).
This tool measures both on the layouts the patch feeds them (strided views of one qkv buffer,
an additive mask with padded keys at -inf), taking turns call by call, and checks they agree.

Example (2 CPU cores, ViT-Ti attention: 3 heads of 64):
    python tools/attention_kernels.py --groups 16 --lengths 197 190 150 120 90 60 45
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from atm_lightning.evaluation.options import HelpFormatter, run_cli
from atm_lightning.patch.attention import MATMUL_ATTENTION_MAX_TOKENS, matmul_attention


@dataclass(frozen=True)
class KernelRow:
    length: int
    fused_ms: float
    matmul_ms: float
    max_abs_diff: float

    @property
    def matmul_speedup(self) -> float:
        return self.fused_ms / self.matmul_ms


def group_inputs(groups: int, length: int, heads: int, head_dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A padded group as the patch builds it: qkv [G, L, 3, H, d] and a [G, 1, 1, L] mask.

    The first image is full; the others end 0-10% early, their padded keys masked with -inf.
    """
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(groups, length, 3, heads, head_dim, generator=g)
    shortest = max(1, int(0.9 * length))
    count = torch.randint(shortest, length + 1, (groups,), generator=g)
    count[0] = length
    padding = (torch.arange(length) >= count[:, None])[:, None, None]
    mask = torch.zeros(groups, 1, 1, length).masked_fill(padding, float("-inf"))
    return qkv, mask


def fused(qkv: Tensor, mask: Tensor, scale: float) -> Tensor:
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, L, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def matmul(qkv: Tensor, mask: Tensor, scale: float) -> Tensor:
    q, k, v = qkv.unbind(2)  # [G, L, H, d]
    return matmul_attention(q, k, v, mask[:, 0], scale)


def median_seconds(calls: dict[str, Callable[[], Tensor]], seconds: float) -> dict[str, float]:
    """Median time of each call; they take turns so drift of the machine hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or min(len(t) for t in times.values()) < 5:
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(args: argparse.Namespace) -> list[KernelRow]:
    rows = []
    scale = args.head_dim**-0.5
    with torch.inference_mode():
        for length in args.lengths:
            qkv, mask = group_inputs(args.groups, length, args.heads, args.head_dim)
            diff = (fused(qkv, mask, scale) - matmul(qkv, mask, scale)).abs().max().item()
            calls = {"fused": partial(fused, qkv, mask, scale), "matmul": partial(matmul, qkv, mask, scale)}
            t = median_seconds(calls, args.seconds)
            rows.append(KernelRow(length, t["fused"] * 1e3, t["matmul"] * 1e3, diff))
    return rows


def markdown_table(rows: list[KernelRow], args: argparse.Namespace) -> str:
    macs = [2 * args.groups * args.heads * r.length**2 * args.head_dim for r in rows]
    lines = [
        "| tokens | fused ms | matmul ms | fused GMAC/s | matmul GMAC/s | matmul speed-up | max abs diff | patch uses |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r, m in zip(rows, macs, strict=True):
        uses = "matmul" if r.length <= MATMUL_ATTENTION_MAX_TOKENS else "fused"
        lines.append(
            f"| {r.length} | {r.fused_ms:.2f} | {r.matmul_ms:.2f} | {m / r.fused_ms / 1e6:.0f} | "
            f"{m / r.matmul_ms / 1e6:.0f} | {r.matmul_speedup:.2f}x | {r.max_abs_diff:.1e} | {uses} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[197, 190, 150, 120, 90, 60, 45])
    parser.add_argument("--groups", type=int, default=16, help="images per padded group")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seconds", type=float, default=1.5, help="timing budget per length")
    return parser


def main(args: argparse.Namespace) -> list[KernelRow]:
    for name in ("lengths", "groups", "heads", "head_dim", "threads"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {values}")
    torch.set_num_threads(args.threads)
    rows = measure(args)
    print(f"{args.groups} images x {args.heads} heads x {args.head_dim} dims, {args.threads} threads, CPU")
    print(markdown_table(rows, args))
    return rows


if __name__ == "__main__":
    run_cli(build_parser(), main)
