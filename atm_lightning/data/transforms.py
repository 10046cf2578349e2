"""Eval and train transforms resolved from a timm model's pretrained config, without building the model."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import timm
from PIL import Image
from timm.data import auto_augment as timm_augment
from timm.data import create_transform, resolve_data_config
from torchvision import transforms


def check_model_name(model_name: str) -> None:
    """Fail early on a misspelt model, with the registered names closest to it."""
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name.split(".")[0], timm.list_models(), n=5)
    hint = f"; did you mean one of {close}?" if close else "; see timm.list_models() for the registered names"
    raise ValueError(f"unknown timm model {model_name!r}{hint}")


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


def check_preprocessing(
    crop_pct: float | None = None,
    interpolation: str | None = None,
    std: tuple[float, ...] | None = None,
    img_size: int | None = None,
) -> None:
    """Refuse eval preprocessing that would run and silently give other images: timm reads a
    crop_pct of 0 as its default and a crop_pct above 1 shrinks the image and pads it black."""
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ValueError(
            f"--data.crop_pct is the share of the resized image kept by the centre crop, in (0, 1] "
            f"(e.g. 0.875 or 0.9; 1.0 keeps it all); got {crop_pct}"
        )
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"--data.interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    if std is not None and not all(value > 0 for value in std):
        raise ValueError(f"--data.std values divide the pixels, so they must be > 0; got {list(std)}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"--data.img_size must be >= 1, got {img_size}")


def resolve_eval_config(
    model_name: str,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    img_size: int | None = None,
) -> dict[str, Any]:
    """The model's pretrained preprocessing with the given overrides.

    Returns the keys input_size, interpolation, mean, std, crop_pct and crop_mode, so every result can
    record exactly how images were prepared (DeiT's timm config says crop_pct 0.9, its paper used 0.875).
    """
    check_model_name(model_name)
    check_preprocessing(crop_pct=crop_pct, interpolation=interpolation, std=std, img_size=img_size)
    try:
        pretrained = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as err:
        tags = timm.list_pretrained(model_name.split(".")[0] + ".*")
        raise ValueError(f"{err} Known pretrained tags: {tags}") from err
    overrides = {"crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std, "img_size": img_size}
    # in_chans keeps the args non-empty: timm asserts on empty args when a model has no pretrained config.
    args = {"in_chans": 3, **{key: value for key, value in overrides.items() if value is not None}}
    cfg = pretrained.to_dict() if pretrained is not None else {}
    return resolve_data_config(args, pretrained_cfg=cfg, use_test_size=True)


def eval_transform(config: dict[str, Any], hflip: bool = False) -> Callable:
    """Resize to size/crop_pct, center crop, to tensor, normalize; ``hflip`` mirrors every image
    first (a transformed copy of an eval set, to check that a setting holds beyond the images it
    was chosen on)."""
    transform = create_transform(**config, is_training=False)
    if hflip:
        transform = transforms.Compose([transforms.RandomHorizontalFlip(p=1.0), transform])
    return transform


def train_transform(
    config: dict[str, Any],
    auto_augment: str | None,
    re_prob: float,
    color_jitter: float,
    hflip: float,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> Callable:
    """DeiT-style augmentation (random resized crop, RandAugment, random erasing) at the eval resolution."""
    transform = create_transform(
        input_size=config["input_size"],
        is_training=True,
        interpolation=config["interpolation"],
        mean=config["mean"],
        std=config["std"],
        auto_augment=auto_augment,
        re_prob=re_prob,
        color_jitter=color_jitter,
        hflip=hflip,
        scale=crop_scale,
    )
    return allow_zero_bit_posterize(transform)


def posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the all-black image Pillow gave before version 13.

    RandAugment's increasing posterize keeps ``4 - int(magnitude / 10 * 4)`` bits, so a magnitude
    drawn at its ceiling of 10 (``rand-m9-mstd0.5-inc1``: about 1 image in 650) asks for 0 bits, which
    Pillow 13 refuses with a ValueError that ended training runs. Older Pillow masked every bit
    away, so returning black keeps the DeiT recipe's distribution exactly.
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_augment.posterize(image, bits_to_keep, **kwargs)


def allow_zero_bit_posterize(transform: Callable) -> Callable:
    """Point the posterize ops of timm's RandAugment, AutoAugment and AugMix in ``transform`` at
    :func:`posterize` (a module-level function, so DataLoader workers can still pickle them)."""
    for stage in getattr(transform, "transforms", [transform]):
        ops = list(getattr(stage, "ops", []))
        for sub_policy in getattr(stage, "policy", []):
            ops += sub_policy
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_augment.posterize:
                op.aug_fn = posterize
    return transform
