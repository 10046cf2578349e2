"""Split a labelled class-folder set into a calibration half and a held-out half, as links.

``atm calibrate`` reads ``train/`` and ``atm validate``/``atm compare`` read ``val/``, so

    python tools/holdout_split.py IMAGES/val SPLIT --fraction 0.5 --seed 0

makes ``SPLIT/train`` (the images a setting is chosen on) and ``SPLIT/val`` (the images it is
reported on) from one folder, without copying: every image is a symbolic link in its own class
folder. The draw is a torch permutation of the sorted image list with ``seed``, so the same
command makes the same split anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atm_lightning.data.images import IMAGE_EXTENSIONS


def images(source: Path) -> list[Path]:
    """Every image under ``source``'s class folders, sorted."""
    found = sorted(p for p in source.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise SystemExit(f"no images in class folders under {source}; expected {source}/<class>/<image>")
    return found


def split(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """The first ``fraction`` of a seeded permutation for calibration, the rest held out."""
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(fraction * len(paths))
    return sorted(paths[i] for i in order[:cut]), sorted(paths[i] for i in order[cut:])


def link(paths: list[Path], folder: Path) -> None:
    for path in paths:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a folder of class folders, e.g. IMAGENET/val")
    parser.add_argument("output", type=Path, help="new folder; gets train/ (calibration) and val/ (held out)")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the images in train/")
    parser.add_argument("--seed", type=int, default=0, help="which images go where")
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction must lie strictly between 0 and 1, got {args.fraction}")
    if args.output.exists():
        parser.error(f"{args.output} exists; choose a new folder")
    found = images(args.source)
    calibration, held_out = split(found, args.fraction, args.seed)
    if not calibration or not held_out:
        parser.error(
            f"--fraction {args.fraction} of {len(found)} images leaves {'train/' if not calibration else 'val/'} "
            f"empty; choose a fraction that puts at least one image in each"
        )
    link(calibration, args.output / "train")
    link(held_out, args.output / "val")
    print(f"{args.output}/train: {len(calibration)} images (calibrate), {args.output}/val: {len(held_out)} (report)")


if __name__ == "__main__":
    main()
