"""Tiny deterministic image datasets on disk for tests.

Images are a flat background with one or two solid shapes in a class colour: real files that the
data pipeline decodes, with large uniform regions so token merging has similar tokens to merge.
Import as `from tests.fakedata import ...` (tests/ is a package; `python -m pytest` puts the repo on sys.path).
"""

from __future__ import annotations

import colorsys
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850")  # ImageNet-1k classes 0, 1, 2


def class_colour(index: int) -> tuple[int, int, int]:
    """A saturated colour per class index, spread around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.9, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_image(label: int, size: int, rng: random.Random) -> Image.Image:
    """Grey-ish background, then one or two rectangles or ellipses in the class colour."""
    background = tuple(rng.randrange(40, 216) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 2)):
        w, h = rng.randint(size // 4, size // 2), rng.randint(size // 4, size // 2)
        x, y = rng.randint(0, size - w), rng.randint(0, size - h)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + w - 1, y + h - 1), fill=class_colour(label))
    return image


def make_image_folder(
    root: Path, classes: Sequence[str], per_class: int, size: int = 64, seed: int = 0, ext: str = ".JPEG"
) -> Path:
    """Write `<root>/<class>/<class>_<i><ext>` for each class; the same seed gives the same files."""
    root = Path(root)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = random.Random(f"{seed}/{name}/{i}")
            draw_image(label, size, rng).save(root / name / f"{name}_{i}{ext}", quality=95)
    return root


def make_flat_val(
    root: Path, n: int, num_classes: int, seed: int = 0, size: int = 64
) -> tuple[Path, Path]:
    """Write the raw ILSVRC val layout: `<root>/val/ILSVRC2012_val_<i>.JPEG` and `<root>/val_labels.txt`.

    The label file has lines `<file name> <class index>` with random labels below `num_classes`.
    """
    folder = Path(root) / "val"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}/flat")
    lines = []
    for i in range(1, n + 1):
        name, label = f"ILSVRC2012_val_{i:08d}.JPEG", rng.randrange(num_classes)
        draw_image(label, size, rng).save(folder / name, quality=95)
        lines.append(f"{name} {label}\n")
    label_file = Path(root) / "val_labels.txt"
    label_file.write_text("".join(lines))
    return folder, label_file
