"""Helpers shared by the tools: method specs, model loading, real images, and CLI error handling.

The tools are thin scripts over ``atm_lightning``; what they have in common lives here so each
script reads as its own measurement and nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atm_lightning import UnsupportedModelError
from atm_lightning.data.images import (  # noqa: F401 - the tools import them from here
    check_not_noise,
    evenly_spaced,
    image_paths,
    load_images,
    unnormalize,
)
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
