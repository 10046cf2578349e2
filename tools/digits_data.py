"""scikit-learn's bundled handwritten digits as an ImageFolder: real images for the offline demo.

Each 8x8 digit (1797 of them, scanned from 43 writers) is upscaled and pasted at the centre of a
larger black canvas (centred like MNIST: a ViT trained from scratch on 1.4k images needs that), so most patches are pure background: the tokens a merger should remove at
no cost, next to the strokes that carry the class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digit_image(pixels: np.ndarray, canvas: int, scale: int) -> Image.Image:
    """One digit (8x8, values 0..16) scaled ``scale`` times, white on a black square canvas."""
    digit = Image.fromarray((pixels * (255 / 16)).astype(np.uint8)).resize(
        (8 * scale, 8 * scale), Image.Resampling.BILINEAR
    )
    image = Image.new("L", (canvas, canvas), 0)
    margin = (canvas - 8 * scale) // 2
    image.paste(digit, (margin, margin))
    return image


def write_digits(
    root: Path, canvas: int = 32, scale: int = 2, val_every: int = 5, limit: int | None = None
) -> dict[str, int]:
    """Write ``root/{train,val}/<digit>/<index>.png``; every ``val_every``-th image of each digit goes to val.

    ``limit`` keeps only the first digits (quick runs). Returns the number of images per split.
    Existing files are overwritten, so the same arguments always give the same folder.
    """
    from sklearn.datasets import load_digits

    if 8 * scale > canvas:
        raise ValueError(f"a digit scaled {scale}x is {8 * scale} px, larger than the {canvas} px canvas")
    digits = load_digits()
    count = {"train": 0, "val": 0}
    seen = [0] * 10
    for index, (pixels, label) in enumerate(zip(digits.images[:limit], digits.target[:limit])):
        # Per class, so every digit is in both splits in the same proportion.
        split = "val" if seen[label] % val_every == 0 else "train"
        seen[label] += 1
        folder = Path(root) / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(pixels, canvas, scale).save(folder / f"{index:04d}.png")
        count[split] += 1
    return count
