"""The ``rerun_margin`` that makes a fraction of some images run again unmerged, for any method.

``atm calibrate --rerun_fraction`` sets ATM's margin while it searches; this sets one for a fixed
method (e.g. ToMe, for a comparison at equal rerun share) from training images, never the
reported ones:

    python tools/rerun_margin.py tome:r=14 --weights W --data-root SPLIT --fraction 0.1

prints the margin: the ``fraction`` quantile of the merged model's top-2 softmax gaps on the
images of ``SPLIT/train`` (ViT-Ti/16 preprocessing; ``--model`` for another timm ViT). The
method's own ``rerun_margin`` is taken off first: the gaps are those of the merged pass alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from atm_lightning.data import ImageNetDataModule
from atm_lightning.evaluation.options import METHOD_HELP, parse_method
from atm_lightning.models import create_model
from atm_lightning.patch import patch
from atm_lightning.patch.rerun import top2_gap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help=METHOD_HELP)
    parser.add_argument("--weights", required=True, help="local .safetensors/.pth weights")
    parser.add_argument("--data-root", required=True, help="folder whose train/ holds class folders of images")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the images to run again (default 0.1)")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the weights' head")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if not 0.0 < args.fraction < 1.0:
        parser.error(f"--fraction must lie in (0, 1), got {args.fraction}")
    try:
        method = parse_method(args.method)
    except (ValueError, FileNotFoundError) as err:  # user mistakes: one error line, not a traceback
        parser.error(str(err))
    merger = dataclasses.replace(method.merger, rerun_margin=0.0)  # the merged pass alone
    model = create_model(args.model, weights=args.weights, num_classes=args.num_classes).eval()
    patch(model, merger, fused=method.fused, attention=method.attention)
    data = ImageNetDataModule(
        args.data_root, model_name=args.model, num_classes=args.num_classes, batch_size=args.batch_size, num_workers=0
    )
    gaps = []
    with torch.inference_mode():
        samples = data.labelled_images(data.train_split, labels_needed=False)  # the images alone
        for images, _ in tqdm(data.eval_loader(samples), desc="merged pass"):
            gaps.append(top2_gap(model(images)))
    print(f"{float(torch.quantile(torch.cat(gaps), args.fraction)):.4g}")


if __name__ == "__main__":
    main()
