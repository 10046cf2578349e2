"""Helpers shared by the tools: method specs, model loading, real images, and CLI error handling.

The tools are thin scripts over ``atm_lightning``; what they have in common lives here so each
script reads as its own measurement and nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor

from atm_lightning import UnsupportedModelError
from atm_lightning.data.datasets import IMAGE_EXTENSIONS, is_image
from atm_lightning.data.transforms import eval_transform, resolve_eval_config
from atm_lightning.merge import NoMerge, TokenMerger
from atm_lightning.merge.specs import build, from_config_file, parse_spec
from atm_lightning.models import create_model
from atm_lightning.patch import RAGGED_MODES

METHOD_HELP = (
    "NAME[:KEY=VALUE,...] with NAME dense, tome, atm or evit (e.g. 'tome:r=13', "
    "'atm:alpha=1.0,beta=0.03,theta_min=0.7,split_layer=10', 'evit:keep_rate=0.7'; lists as "
    "'tome:r=[8,8,...]'; add 'ragged=padded' to run ragged batches padded instead of packed), "
    "or a project config YAML whose model.merger gives the method (e.g. configs/vit_t_atm.yaml)"
)
# Below this neighbouring-pixel correlation an image is noise: photos score above 0.8.
NOISE_CORRELATION = 0.5


@dataclass(frozen=True)
class Method:
    """A merging method as the user named it, with the policy it builds."""

    label: str
    merger: TokenMerger
    ragged: str = "packed"  # how images left with different token counts run (patch's ``ragged``)

    @property
    def dense(self) -> bool:
        """The unmerged baseline (``tome:r=0`` is not: it still runs the merging code)."""
        return type(self.merger) is NoMerge


def parse_method(spec: str) -> Method:
    """Build a :class:`Method` from ``NAME[:KEY=VALUE,...]`` or a config YAML path (see METHOD_HELP)."""
    if spec.endswith((".yaml", ".yml")):
        return Method(Path(spec).stem, from_config_file(spec))
    name, settings = parse_spec(spec)
    ragged = str(settings.pop("ragged", "packed"))
    if ragged not in RAGGED_MODES:
        raise ValueError(f"bad settings in {spec!r}: ragged must be one of {RAGGED_MODES}")
    return Method(spec, build(name, settings, spec), ragged)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` plus exactly one weights source: merge counts on random weights mean little."""
    parser.add_argument(
        "--model", default="vit_tiny_patch16_224", help="timm model name (default: %(default)s)"
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="local weights: .safetensors, .pth or an `atm fit` checkpoint",
    )
    weights.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's published weights (needs the network or a hub cache)",
    )
    weights.add_argument(
        "--random-init",
        action="store_true",
        help="random weights, for smoke tests only (merging is not typical)",
    )


def load_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The model of ``--model``/``--weights``/``--pretrained``, in eval mode on ``device``, with the
    classifier the weights have (the tools measure merging, not a label set)."""
    weights = str(args.weights) if args.weights is not None else None
    model = create_model(args.model, pretrained=args.pretrained, weights=weights, num_classes=None)
    return model.eval().to(device)


def image_paths(inputs: Sequence[Path]) -> list[Path]:
    """Image files among ``inputs``; folders are searched recursively, in sorted order."""
    paths: list[Path] = []
    for item in inputs:
        if not item.exists():
            raise FileNotFoundError(
                f"{item} does not exist; check the path (a folder of images or image files)"
            )
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image(p))
            if not found:
                raise FileNotFoundError(
                    f"no images (.JPEG, .png, ...) in {item}; point to a folder of images"
                )
            paths += found
        elif is_image(item):
            paths.append(item)
        else:
            raise ValueError(
                f"{item} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass images or folders"
            )
    return paths


def evenly_spaced(paths: Sequence[Path], count: int) -> list[Path]:
    """``count`` paths spread over the list, so a class-sorted folder gives varied content."""
    if count > len(paths):
        raise ValueError(f"asked for {count} images but found only {len(paths)}; lower --num-images")
    return [paths[i * len(paths) // count] for i in range(count)]


def load_images(paths: Sequence[Path], model_name: str) -> tuple[Tensor, dict]:
    """[N, 3, H, W] images through the model's eval transform, and that transform's config."""
    config = resolve_eval_config(model_name)
    transform = eval_transform(config)
    return torch.stack([transform(_open_rgb(path)) for path in paths]), config


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as file:
            return file.convert("RGB")
    except OSError as err:
        raise ValueError(f"cannot read image {path} ({err}); replace or remove the file") from None


def check_not_noise(paths: Sequence[Path]) -> None:
    """Refuse image sets whose median image looks like random noise.

    Token merging depends on content and noise merges almost nothing, so throughput measured on
    it says nothing about real images.
    """
    correlations = torch.stack([neighbour_correlation(pil_to_tensor(_open_rgb(p)).float()) for p in paths])
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


def unnormalize(images: Tensor, config: dict) -> Tensor:
    """Undo the eval transform's normalisation, back to [0, 1] for painting and saving."""
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    return (images.cpu().float() * std + mean).clamp(0, 1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show real defaults (not None/False) and keep the description's example commands as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], None], argv=None) -> None:
    """Parse ``argv`` and run ``main``; user mistakes end as one ``error:`` line, not a traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as err:
        parser.error(str(err))
