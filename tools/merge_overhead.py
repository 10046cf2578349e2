"""What the merge step costs at batch 1: a merging method against the same token counts without it.

A merged forward saves the arithmetic of the tokens it drops and pays for the merge step
(similarities, weights, the merge itself, the bookkeeping around them). This times, image by
image and in turns, three forwards of the same model:

- ``dense``: timm's own forward;
- the method: the patched model's merged pass (a ``rerun_margin`` is set to 0, since a second
  pass is not part of the merge step);
- ``same tokens``: timm's blocks on exactly the token counts the method left in each block for
  that image, the surplus tokens cut off, with no merge step: what the method would cost if
  merging were free.

    python tools/merge_overhead.py configs/vit_t_atm.yaml --weights W --data-root IMAGENET/val \\
        --num-images 64 --runs 5

It prints milliseconds per image (median over the runs), the speed-up of each against dense and
the method's FLOPs ratio. The gap between the method and ``same tokens`` is what the merge step
(with the patched block loop around it) costs. By default (``fused=auto``) ATM's merge step runs
in the compiled CPU kernel where it can be built (:mod:`atm_lightning.merge.fused`);
``configs/vit_t_atm.yaml:fused=false`` times the batched step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from atm_lightning.data.images import check_not_noise, evenly_spaced, image_paths, load_images
from atm_lightning.evaluation.options import HelpFormatter, add_model_args, load_model, parse_method, run_cli
from atm_lightning.patch import merge_stats, patch, unpatch
from atm_lightning.threads import set_threads


def same_tokens_forward(model: VisionTransformer, image: Tensor, tokens: list[int]) -> Tensor:
    """timm's forward of one image whose block ``l`` attends over its first ``tokens[l]`` tokens
    and runs its MLP on the first ``tokens[l + 1]`` (``tokens`` as in ``MergeStats.tokens``)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image))))
    for layer, block in enumerate(model.blocks):
        x = x[:, : tokens[layer]]
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = x[:, : tokens[layer + 1]]
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.forward_head(model.norm(x))


def token_counts(model: nn.Module, images: Tensor) -> tuple[list[list[int]], float]:
    """Per image, the tokens entering each block and leaving the last, under the patched model;
    and the dense GFLOPs over the method's mean GFLOPs (the FLOPs ratio)."""
    counts, gflops = [], 0.0
    with torch.inference_mode():
        for image in images:
            model(image[None])
            stats = merge_stats(model)
            counts.append([int(n) for n in stats.tokens[0]])
            gflops += float(stats.gflops[0])
    return counts, stats.gflops_dense * len(images) / gflops


def main(args: argparse.Namespace) -> dict[str, float]:
    if args.num_images < 1 or args.runs < 1:
        raise ValueError(f"--num-images and --runs must be >= 1, got {args.num_images} and {args.runs}")
    method = parse_method(args.method)
    if method.dense:
        raise ValueError("the method merges nothing: name a merging method, e.g. tome:r=9 or configs/vit_t_atm.yaml")
    merger = method.merger
    if getattr(merger, "rerun_margin", 0.0) > 0:
        merger = dataclasses.replace(merger, rerun_margin=0.0)
    set_threads(args.threads, workers=0)
    model = load_model(args, torch.device("cpu"))
    if type(model) is not VisionTransformer:
        raise ValueError(f"--model {args.model} is not a plain timm VisionTransformer; this tool cuts tokens in its blocks")
    paths = evenly_spaced(image_paths([args.data_root]), args.num_images)
    check_not_noise(paths)
    images, _ = load_images(paths, args.model)
    fused = method.fused
    patch(model, merger, fused=fused, attention=method.attention)
    counts, flops_ratio = token_counts(model, images)
    turns = [  # (name, set the model up outside the timer, forward of image i)
        ("dense", lambda: unpatch(model), lambda i: model(images[i : i + 1])),
        (method.label, lambda: patch(model, merger, fused=fused, attention=method.attention), lambda i: model(images[i : i + 1])),
        ("same tokens", lambda: unpatch(model), lambda i: same_tokens_forward(model, images[i : i + 1], counts[i])),
    ]
    seconds = {name: [0.0] * args.runs for name, _, _ in turns}
    with torch.inference_mode():
        for name, setup, forward in turns:  # one untimed forward each
            setup()
            forward(0)
        for run in range(args.runs):
            for i in range(len(images)):
                for name, setup, forward in turns:
                    setup()
                    start = time.perf_counter()
                    forward(i)
                    seconds[name][run] += time.perf_counter() - start
    unpatch(model)
    ms = {name: statistics.median(s) / len(images) * 1000 for name, s in seconds.items()}
    print(f"{len(images)} images, batch 1, {torch.get_num_threads()} threads, {args.runs} runs (median); "
          f"FLOPs ratio of {method.label}: {flops_ratio:.2f}x")
    print("| forward | ms/img | speed-up |\n|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {ms['dense'] / value:.2f}x |")
    step = ms[method.label] - ms["same tokens"]
    print(f"merge step (and the patched block loop): {step:.1f} ms/img, {step / ms['dense']:.0%} of a dense forward")
    return ms


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("method", help="a merging method spec (tome:r=9) or a project config YAML")
    add_model_args(parser)
    parser.add_argument("--data-root", required=True, help="folder of real images, searched recursively")
    parser.add_argument("--num-images", type=int, default=32, help="images taken evenly spaced from the folder")
    parser.add_argument("--runs", type=int, default=5, help="timed passes; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    return parser


if __name__ == "__main__":
    run_cli(build_parser(), main)
