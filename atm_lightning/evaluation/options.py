"""What ``atm compare``, ``atm benchmark`` and the scripts in tools/ share: method arguments,
model arguments, help formatting, error handling and CSV output."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..merge import NoMerge, TokenMerger
from ..merge.fused import fusable, is_fused_mode
from ..merge.specs import SPEC_HELP, build, from_config_file, parse_spec
from ..models import create_model
from ..patch import ATTENTION_KERNELS, UnsupportedModelError

METHOD_HELP = (
    f"{SPEC_HELP}; or a project config YAML whose model.merger gives the method (e.g. "
    f"configs/vit_t_atm.yaml). Either may add how it runs: 'fused=auto' (the default, as in atm "
    f"validate) runs ATM's merge step in the compiled CPU kernel where it builds, 'fused=true' "
    f"insists, 'fused=false' runs the batched step (e.g. 'configs/vit_t_atm.yaml:fused=false'); "
    f"'attention=flex' attends with FlexAttention instead of SDPA; 'compile=true' compiles its blocks"
)
EXECUTION_OPTIONS = ("fused", "attention", "compile")


@dataclass(frozen=True)
class Method:
    """A merging method as the user named it, with the policy it builds."""

    label: str
    merger: TokenMerger
    fused: bool | str = "auto"  # ATM's merge step runs in the compiled CPU kernel (patch's ``fused``)
    attention: str = "sdpa"  # the attention kernel (patch's ``attention``)
    compile: bool = False  # its blocks run compiled (patch's ``compile``), whatever the command's --compile

    @property
    def dense(self) -> bool:
        """The unmerged baseline (``tome:r=0`` is not: it still runs the merging code)."""
        return type(self.merger) is NoMerge


def parse_method(spec: str) -> Method:
    """A :class:`Method` from ``NAME[:KEY=VALUE,...]`` or ``CONFIG.yaml[:KEY=VALUE,...]`` (see METHOD_HELP)."""
    path, dot, options = spec.partition(".yaml")
    if not dot:
        path, dot, options = spec.partition(".yml")
    if dot and (not options or options.startswith(":")):
        _, settings = parse_spec(spec)  # the path before the colon, the options after it
        unknown = sorted(set(settings) - set(EXECUTION_OPTIONS))
        if unknown:
            raise ValueError(
                f"bad settings in {spec!r}: a config file's method is fixed; only {EXECUTION_OPTIONS} "
                f"may follow it, not {unknown}"
            )
        fused, attention, compile = execution_options(settings, spec)
        label, merger = Path(path + dot).stem + options, from_config_file(path + dot)
    else:
        name, settings = parse_spec(spec)
        fused, attention, compile = execution_options(settings, spec)
        label, merger = spec, build(name, settings, spec)
    if fused is True and not fusable(merger):
        raise ValueError(f"bad settings in {spec!r}: fused=true runs ATM's exact rule only; use fused=auto or false")
    return Method(label, merger, fused, attention, compile)


def execution_options(settings: dict[str, Any], spec: str) -> tuple[bool | str, str, bool]:
    """``fused``, ``attention`` and ``compile`` taken out of ``settings``: how a method runs, not
    what it merges."""
    fused = settings.pop("fused", "auto")
    if not is_fused_mode(fused):
        raise ValueError(f"bad settings in {spec!r}: fused must be true, false or auto, got {fused!r}")
    attention = str(settings.pop("attention", "sdpa"))
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"bad settings in {spec!r}: attention must be one of {ATTENTION_KERNELS}")
    compile = settings.pop("compile", False)
    if not isinstance(compile, bool):
        raise ValueError(f"bad settings in {spec!r}: compile must be true or false, got {compile!r}")
    return fused, attention, compile


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` plus exactly one weights source: merge counts on random weights mean little."""
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (default: %(default)s)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--weights", type=Path, metavar="FILE", help="local weights: .safetensors, .pth or an `atm fit` checkpoint"
    )
    weights.add_argument(
        "--pretrained", action="store_true", help="timm's published weights (needs the network or a hub cache)"
    )
    weights.add_argument(
        "--random-init", action="store_true", help="random weights, for smoke tests only (merging is not typical)"
    )


def load_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The model of ``--model``/``--weights``/``--pretrained``, in eval mode on ``device``, with the
    classifier the weights have (these commands measure merging, not a label set)."""
    weights = str(args.weights) if args.weights is not None else None
    model = create_model(args.model, pretrained=args.pretrained, weights=weights, num_classes=None)
    return model.eval().to(device)


def weights_label(args: argparse.Namespace) -> str:
    """Where the weights came from, as result files record it."""
    if args.weights:
        return str(args.weights)
    return "timm-pretrained" if args.pretrained else "random-init"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show real defaults (not None/False) and keep the description's example commands as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], Any], argv=None) -> Any:
    """Parse ``argv`` and run ``main``; user mistakes end as one ``error:`` line, not a traceback."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as err:
        parser.error(str(err))


def write_csv(rows: Sequence[Any], path: Path) -> None:
    """One line per dataclass row, its fields as columns."""
    records = [asdict(row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
