"""Which dense predictions a merging method changes, and how many a rerun share would take back.

Top-1 moves only through changed predictions: one that turns a correct dense answer wrong
loses a point, one that turns a wrong answer right gains one, the rest change nothing. This
ranks held-out images by the merged model's top-2 softmax gap, least certain first (the order
in which ``rerun_margin`` runs images again), cuts them into bands and counts each kind per
band, with the top-1 change left if every band up to that one ran again unmerged:

    python tools/changed_predictions.py configs/vit_t_atm_40.yaml --weights W --data-root SPLIT

reads the labelled images of SPLIT/val (``--split``) with the model's eval preprocessing. The
method runs without its ``rerun_margin``, so the first row is the merged pass alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor
from tqdm import tqdm

from atm_lightning.data import ImageNetDataModule
from atm_lightning.evaluation.options import METHOD_HELP, parse_method
from atm_lightning.fidelity import compare_batch
from atm_lightning.models import create_model
from atm_lightning.patch import patch, unpatch
from atm_lightning.patch.rerun import top2_gap


@dataclass(frozen=True)
class Band:
    """Images whose merged top-2 gap ranks in ``[start, end)`` (shares of all images)."""

    start: float
    end: float
    images: int
    changed: int  # merged top-1 differs from the dense one
    lost: int  # dense right, merged wrong
    gained: int  # dense wrong, merged right
    top1_change_after_rerun: float  # points, when this band and all before it run again unmerged


def check_edges(edges: Sequence[float]) -> None:
    """Band ends must be shares that rise strictly inside (0, 1)."""
    if list(edges) != sorted(set(edges)) or not all(0.0 < e < 1.0 for e in edges):
        raise ValueError(f"--bands must rise strictly inside (0, 1), e.g. 0.05 0.1 0.2; got {list(edges)}")


def bands(dense: Tensor, merged: Tensor, labels: Tensor, edges: Sequence[float]) -> list[Band]:
    """The table for logits ``dense`` and ``merged`` [N, classes] and ``labels`` [N]; ``edges``
    are the rising shares (in (0, 1)) where bands end; a last band takes the rest."""
    check_edges(edges)
    n = len(labels)
    order = top2_gap(merged).argsort(stable=True)  # least certain first
    cuts = [0, *(round(share * n) for share in edges), n]
    counted = []  # (band, its fidelity sums: agree, lost, gained, ...)
    for start, end in itertools.pairwise(cuts):
        band = order[start:end]
        counted.append((start, end, compare_batch(merged[band], dense[band], labels[band])))
    net = sum(int(s["gained"]) - int(s["lost"]) for _, _, s in counted)  # merged minus dense top-1, in images
    rows = []
    for start, end, sums in counted:
        net -= int(sums["gained"]) - int(sums["lost"])  # these images now give the dense answer
        rows.append(
            Band(
                start=start / n,
                end=end / n,
                images=end - start,
                changed=end - start - int(sums["agree"]),
                lost=int(sums["lost"]),
                gained=int(sums["gained"]),
                top1_change_after_rerun=100.0 * net / n,
            )
        )
    return rows

def markdown(rows: Sequence[Band], total_change: float) -> str:
    """The table as Markdown, with the merged pass alone on the first line."""
    lines = [
        "| merged top-2 gap rank | images | changed | lost | gained | top-1 change if run again up to here |",
        "|---|---:|---:|---:|---:|---:|",
        f"| (no rerun) | - | {sum(r.changed for r in rows)} | {sum(r.lost for r in rows)} "
        f"| {sum(r.gained for r in rows)} | {total_change:+.2f} |",
    ]
    for r in rows:
        lines.append(
            f"| {100 * r.start:.0f}-{100 * r.end:.0f}% | {r.images} | {r.changed} | {r.lost} | {r.gained} "
            f"| {r.top1_change_after_rerun:+.2f} |"
        )
    return "\n".join(lines)


def logits_over(model: torch.nn.Module, loader, desc: str) -> tuple[Tensor, Tensor]:
    """The model's logits and the labels over every batch of ``loader``."""
    outputs, labels = [], []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc=desc):
            outputs.append(model(images).float())
            labels.append(targets)
    return torch.cat(outputs), torch.cat(labels)


def main(argv: list[str] | None = None) -> list[Band]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help=METHOD_HELP)
    parser.add_argument("--weights", required=True, help="local .safetensors/.pth weights")
    parser.add_argument("--data-root", required=True, help="folder whose --split holds class folders of images")
    parser.add_argument("--split", default="val", help="the labelled images to report on (default val)")
    parser.add_argument(
        "--bands", type=float, nargs="+", default=[0.05, 0.1, 0.2],
        help="shares of the images where bands end, least certain first (default 0.05 0.1 0.2)",
    )
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the weights' head")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        return report(args)
    except (ValueError, FileNotFoundError) as err:  # user mistakes: one error line, not a traceback
        parser.error(str(err))


def report(args: argparse.Namespace) -> list[Band]:
    """Run both passes over the labelled images and print the table."""
    method = parse_method(args.method)
    check_edges(args.bands)
    merger = dataclasses.replace(method.merger, rerun_margin=0.0)  # every policy has one
    data = ImageNetDataModule(
        args.data_root, model_name=args.model, num_classes=args.num_classes, batch_size=args.batch_size, num_workers=0
    )
    loader = data.eval_loader(data.labelled_images(args.split))
    model = create_model(args.model, weights=args.weights, num_classes=args.num_classes).eval()
    dense, labels = logits_over(model, loader, "dense pass")
    patch(model, merger, fused=method.fused, attention=method.attention)
    merged, _ = logits_over(model, loader, "merged pass")
    unpatch(model)
    rows = bands(dense, merged, labels, args.bands)
    total = 100.0 * sum(r.gained - r.lost for r in rows) / len(labels)  # the merged pass alone
    print(f"{args.method} without rerun on {len(labels)} images of {args.split}/: dense top-1 "
          f"{100.0 * float((dense.argmax(-1) == labels).float().mean()):.2f}%")
    print(markdown(rows, total))
    return rows

if __name__ == "__main__":
    main()
