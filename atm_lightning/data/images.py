"""Image files: finding them, opening them, preprocessing them for a model, and telling photos from noise."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from .transforms import eval_transform, resolve_eval_config

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"})
# Below this neighbouring-pixel correlation an image is noise: photos score above 0.8.
NOISE_CORRELATION = 0.5


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def open_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB, its pixel values scaled from their own bit depth; a file that
    cannot be decoded, or whose values have no known range, is a ValueError naming it."""
    try:
        with Image.open(path) as file:
            return to_rgb(file, path)
    except OSError as err:
        raise ValueError(f"cannot read image {path} ({err}); replace or delete the file") from None


def to_rgb(image: Image.Image, path: Path | str = "image") -> Image.Image:
    """8-bit RGB from any mode Pillow reads. Pillow's own ``convert("RGB")`` clips 16-bit and
    32-bit values at 255 (a 16-bit grey PNG came out all white), so those are scaled first:
    16-bit by 255/65535; 32-bit integers only from PNG (16-bit grey in older Pillow); floats when
    they lie in [0, 1]. Other integer or float images have no range to scale from: an error."""
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
        image = image.convert("I").point(lambda value: value * (255 / 65535) + 0.5).convert("L")
    elif mode == "F":
        low, high = image.getextrema()
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"{path} holds floating-point pixels from {low:g} to {high:g}, not in [0, 1], so their "
                f"brightness is unknown; save it as an 8- or 16-bit image"
            )
        image = image.point(lambda value: value * 255 + 0.5).convert("L")
    elif mode == "I":
        raise ValueError(
            f"{path} holds 32-bit integer pixels, whose brightness range is unknown; save it as an "
            f"8- or 16-bit image"
        )
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert {path} (mode {mode}) to RGB ({err}); save it as an RGB image") from None


def image_paths(inputs: Sequence[Path]) -> list[Path]:
    """Image files among ``inputs``; folders are searched recursively, in sorted order."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"{item} does not exist; check the path (a folder of images or image files)")
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image(p))
            if not found:
                raise FileNotFoundError(f"no images (.JPEG, .png, ...) in {item}; point to a folder of images")
            paths += found
        elif is_image(item):
            paths.append(item)
        else:
            raise ValueError(f"{item} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass images or folders")
    return paths


def evenly_spaced(paths: Sequence[Path], count: int) -> list[Path]:
    """``count`` paths spread over the list, so a class-sorted folder gives varied content."""
    if count > len(paths):
        raise ValueError(f"asked for {count} images but found only {len(paths)}; lower --num-images")
    return [paths[i * len(paths) // count] for i in range(count)]


def load_images(paths: Sequence[Path], model_name: str) -> tuple[Tensor, dict[str, Any]]:
    """[N, 3, H, W] images through the model's eval transform, and that transform's config."""
    config = resolve_eval_config(model_name)
    transform = eval_transform(config)
    return torch.stack([transform(open_rgb(path)) for path in paths]), config


def unnormalize(images: Tensor, config: dict[str, Any]) -> Tensor:
    """Undo the eval transform's normalisation (``config``'s mean and std), back to [0, 1]."""
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    return (images.cpu().float() * std + mean).clamp(0, 1)


def check_not_noise(paths: Sequence[Path]) -> None:
    """Refuse image sets whose median image looks like random noise.

    Token merging depends on content and noise merges almost nothing, so throughput measured on
    it says nothing about real images.
    """
    correlations = torch.stack([neighbour_correlation(pil_to_tensor(open_rgb(p)).float()) for p in paths])
    median = float(correlations.median())
    if median < NOISE_CORRELATION:
        example = paths[int(correlations.argmin())]
        raise ValueError(
            f"the images look like random noise (median neighbouring-pixel correlation {median:.2f} < "
            f"{NOISE_CORRELATION}, e.g. {example}); noise merges almost no tokens, so use real photos, "
            f"e.g. an ImageNet val folder"
        )


def neighbour_correlation(image: Tensor) -> Tensor:
    """Correlation of horizontally adjacent pixels of a [C, H, W] image, mean over channels.

    Photos score near 1, i.i.d. noise near 0; a flat channel counts as perfectly smooth. Measured
    before resizing, since interpolation would smooth noise.
    """
    left, right = image[:, :, :-1].flatten(1), image[:, :, 1:].flatten(1)
    left, right = left - left.mean(1, keepdim=True), right - right.mean(1, keepdim=True)
    denom = (left.square().sum(1) * right.square().sum(1)).sqrt()
    corr = (left * right).sum(1) / denom
    return torch.where(denom > 0, corr, torch.ones_like(corr)).mean()
