"""Dense, ToMe and EViT sweeps, ATM operating points and fine-tuned checkpoints: one table, CSV and plot.

Every row is an ``atm validate`` run in this process (the same ATMCLI, TokenMergingModule,
ImageNetDataModule and ``Trainer.validate``), so its numbers equal what a single ``atm validate``
with the same options writes to metrics.json; compare takes them, and each image's prediction,
from the module. Options that are not compare's own (``--model.*``, ``--data.*``,
``--trainer.*``) go to every run unchanged, so all rows share images, preprocessing and batch size;
each run's metrics.json and TensorBoard events land under OUTPUT/runs/<row>.

Each row is measured against the dense row on the same images: agreement (top-1 class
unchanged), the top-1 change with its 95% paired-bootstrap interval, and the mean KL of the
row's output from its own unmerged model's (for a checkpoint: the unmerged checkpoint; for a
distilled row, a delta of ``atm fit --model.distill``: the base model without it). The plot
draws the top-1 change with its interval and the agreement against GFLOPs, one curve per family.
``--sweep`` fills in the ToMe and EViT sweeps that a curve needs.

Example (ViT-Ti weights, 200 images of an ImageNet folder):
    atm compare --config configs/vit_t.yaml --model.weights vit_tiny_patch16_224.safetensors \\
        --data.root IMAGENET --data.limit 200 \\
        --tome_r 4 8 13 16 --atm configs/vit_t_atm.yaml my_atm.yaml --output runs/compare
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..cli import run_in_process
from ..delta import is_delta_file
from ..fidelity import top1_change
from ..merge import EViT, NoMerge, TokenMerger, ToMe, to_config
from ..results import METRICS_FILE
from ..runs import check_writable_folder
from .options import METHOD_HELP, HelpFormatter, parse_method, write_csv
from .plot import plot, require_matplotlib
from .row_configs import check_row_config
from .tables import Row, markdown_table, merge_tables, pareto_front

SWEEP_TOME_R = (2, 4, 6, 8, 10, 12, 13, 14, 16)
SWEEP_EVIT_KEEP = (0.9, 0.8, 0.7, 0.6, 0.5)
PASSTHROUGH_PREFIXES = ("--model.", "--data.", "--trainer.", "--seed_everything")
OWN_SETTINGS = ("--model.merger", "--trainer.logger")
RESULT_FILES = ("compare.md", "compare.csv", "compare.png")


@dataclass(frozen=True)
class Run:
    """One row to evaluate: a merger, and for a fine-tuned checkpoint its own weights or for a
    distilled point its delta on the base weights."""

    label: str
    family: str  # dense, ToMe, EViT, ATM (each also "+ rerun"), checkpoint or distilled: one colour each
    merger: TokenMerger
    weights: str | None = None
    delta: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atm compare",
        description=__doc__,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        epilog="Any other option is an `atm validate` option given to every run, e.g. --model.weights W "
        "--data.root R --data.limit 200 --data.batch_size 32 --trainer.accelerator cpu.",
    )
    parser.add_argument("--config", help="base `atm validate` config, e.g. configs/vit_t.yaml (required unless --merge)")
    parser.add_argument(
        "--tome_r", type=int, nargs="*", default=None, metavar="R",
        help=f"ToMe merges per block to sweep (default 4 8 13 16; with --sweep {' '.join(map(str, SWEEP_TOME_R))})",
    )
    parser.add_argument(
        "--evit_keep", type=float, nargs="*", default=None, metavar="RATE",
        help=f"EViT keep rates to sweep (default none; with --sweep {' '.join(map(str, SWEEP_EVIT_KEEP))})",
    )
    parser.add_argument(
        "--evit_layers", type=int, nargs="*", default=None, metavar="BLOCK",
        help="1-indexed blocks where the EViT rows prune (default EViT's 4 7 10, for 12-block models)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="curves: fill in the ToMe and EViT sweeps not given explicitly"
    )
    parser.add_argument(
        "--atm", nargs="*", default=[], metavar="METHOD", help=f"ATM operating points, each {METHOD_HELP}"
    )
    parser.add_argument(
        "--checkpoint",
        nargs="*",
        default=[],
        metavar="NAME=PATH[:METHOD]",
        help="fine-tuned weights evaluated with METHOD (default dense), e.g. ft=runs/ft.ckpt:tome:r=13; "
        "a delta file of `atm fit --model.distill` is applied to --model.weights (a 'distilled' row), "
        "e.g. dist=delta.safetensors:configs/vit_t_atm_40.yaml",
    )
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="CSV",
        help="evaluate nothing: combine the compare.csv of earlier runs on the same images (same image "
        "count and dense top-1) into one table, CSV and plot; rows of the later files replace same-named ones",
    )
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="folder for the results")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the compare.md/csv/png of an earlier compare in --output"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return parser


def main(args: argparse.Namespace, passthrough: list[str]) -> list[Row]:
    if not args.no_plot:
        require_matplotlib()
    check_output(args.output, args.overwrite)
    if args.merge:
        if passthrough:
            raise ValueError(f"--merge evaluates nothing; drop {' '.join(passthrough)}")
        rows = merge_tables(args.merge)
    else:
        if args.config is None or not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config} does not exist; pass an `atm validate` config")
        check_passthrough(passthrough)
        for spec in args.atm:
            check_row_config(spec, args.config, passthrough)
        runs = plan(args)
        results = [evaluate(run, args.config, passthrough, args.output) for run in runs]
        rows = to_rows(runs, results)
    table = markdown_table(rows)
    print(table)  # before writing: a table that cannot be written is still shown
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compare.md").write_text(table + "\n")
    write_csv(rows, args.output / "compare.csv")
    if not args.no_plot:
        plot(rows, args.output / "compare.png")
    print(f"\nwrote {args.output}/compare.md, compare.csv" + ("" if args.no_plot else ", compare.png"))
    return rows


def check_output(output: Path, overwrite: bool) -> None:
    """Before any run: the results of an earlier compare in ``output`` stay unless asked."""
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output} is a file; compare writes a folder, e.g. --output runs/compare")
    earlier = [name for name in RESULT_FILES if (output / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{output} already holds {', '.join(earlier)} of an earlier compare; pass --overwrite to "
            f"replace them, or choose another --output"
        )
    check_writable_folder(output)


def check_passthrough(options: list[str]) -> None:
    """Only `atm validate` settings may pass through, and not the two compare sets per row."""
    for option in (o for o in options if o.startswith("-")):
        name = option.split("=", 1)[0]
        if not name.startswith(PASSTHROUGH_PREFIXES):
            raise ValueError(f"unknown option {name}; see --help (other options must be --model.*, --data.*, --trainer.*)")
        if name.startswith(OWN_SETTINGS):
            raise ValueError(f"{name} is set per row by compare; use --tome_r/--atm/--checkpoint and --output")


def plan(args: argparse.Namespace) -> list[Run]:
    """Dense first (the reference for agreement), then ToMe, ATM and the checkpoints."""
    runs = [Run("dense", "dense", NoMerge())]
    tome_r = args.tome_r if args.tome_r is not None else SWEEP_TOME_R if args.sweep else (4, 8, 13, 16)
    evit_keep = args.evit_keep if args.evit_keep is not None else SWEEP_EVIT_KEEP if args.sweep else ()
    runs += [Run(f"ToMe r={r}", "ToMe", ToMe(r=r)) for r in tome_r]
    runs += [Run(f"EViT keep={k:g}", "EViT", EViT(keep_rate=k, prune_layers=args.evit_layers)) for k in evit_keep]
    for spec in args.atm:
        method = parse_method(spec)
        family = type(method.merger).__name__  # ATM, or another method given inline (ToMe, EViT)
        family += " + rerun" if method.merger.rerun_margin > 0 else ""  # a curve of its own
        runs.append(Run(method.label if spec.endswith((".yaml", ".yml")) else family, family, method.merger))
    runs += [parse_checkpoint(spec) for spec in args.checkpoint]
    return runs


def parse_checkpoint(spec: str) -> Run:
    """``NAME=PATH[:METHOD]`` -> a run of those weights (or that delta on the base weights) with that
    method (dense by default)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"cannot read --checkpoint {spec!r}; write NAME=PATH[:METHOD], e.g. ft=ft.ckpt:tome:r=13")
    path, _, method = rest.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--checkpoint {name}: {path} does not exist")
    merger = parse_method(method or "dense").merger
    if is_delta_file(path):
        return Run(name, "distilled", merger, delta=path)
    return Run(name, "checkpoint", merger, weights=path)


@dataclass(frozen=True)
class Evaluated:
    """One row's run: the module's results, its images' top-1 classes and labels, and where its files are."""

    results: dict[str, Any]
    predictions: Tensor  # [N] in loader order
    targets: Tensor  # [N]
    batch_size: int
    metrics_path: Path


def evaluate(run: Run, config: str, passthrough: list[str], output: Path) -> Evaluated:
    """One ``atm validate`` of ``run`` in-process (it writes metrics.json and TensorBoard events)."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(output / "runs"), "name": slug(run.label), "default_hp_metric": False},
    }
    args = ["validate", "--config", config, *passthrough, "--model.merger", json.dumps(to_config(run.merger))]
    args += ["--trainer.logger", json.dumps(logger)]
    if run.weights is not None:
        args += ["--model.weights", run.weights]
    if run.delta is not None:
        args += ["--model.delta", run.delta]
    cli = run_in_process(args)
    module = cli.model
    path = Path(cli.trainer.log_dir) / METRICS_FILE
    return Evaluated(
        module.results["val"], module.predictions["val"], module.targets["val"], cli.datamodule.batch_size, path
    )


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def against_dense(e: Evaluated, dense: Evaluated) -> dict[str, Any]:
    """Agreement and the top-1 change (with its interval) of one row against the dense row."""
    if len(e.predictions) != len(dense.predictions) or not (e.targets == dense.targets).all():
        none = dict.fromkeys(("agreement_pct", "top1_change", "ci_low", "ci_high", "lossless"))
        return none  # not the same images in the same order (several devices): no paired comparison
    right, dense_right = e.predictions == e.targets, dense.predictions == dense.targets
    change = top1_change(int((dense_right & ~right).sum()), int((right & ~dense_right).sum()), len(e.targets))
    return {
        "agreement_pct": 100 * float((e.predictions == dense.predictions).double().mean()),
        "top1_change": change.change,
        "ci_low": change.low,
        "ci_high": change.high,
        "lossless": change.lossless,
    }


def to_rows(runs: list[Run], evaluated: list[Evaluated]) -> list[Row]:
    front = pareto_front([(e.results["gflops"], e.results["top1"]) for e in evaluated])
    rows = []
    for i, (run, e) in enumerate(zip(runs, evaluated, strict=True)):
        rows.append(
            Row(
                method=run.label,
                family=run.family,
                params=describe(run),
                gflops=e.results["gflops"],
                reduction_pct=100 * e.results["flops_reduction"],
                top1=e.results["top1"],
                top5=e.results["top5"],
                **against_dense(e, evaluated[0]),
                kl=e.results.get("kl"),
                img_per_s=e.results["img_per_s"],
                num_images=e.results["num_images"],
                batch_size=e.batch_size,
                pareto=i in front,
                metrics=str(e.metrics_path),
            )
        )
    return rows


def describe(run: Run) -> str:
    params = {k: v for k, v in run.merger.params().items() if k != "method"}
    if params.get("batch_rule") == "exact":
        params.pop("batch_rule")  # each image on its own: the rule every shipped point uses
    if params.get("prop_attn") == type(run.merger)().prop_attn:
        params.pop("prop_attn")  # the method's own choice
    for shared in ("rerun_margin", "last_block_prefix_only"):
        if not params.get(shared):
            params.pop(shared, None)  # off: the papers' methods
    text = " ".join(f"{k}={v}" for k, v in params.items()) or "-"
    own = run.weights or run.delta
    return text + (f" ({Path(own).name})" if own else "")


def cli(argv: list[str] | None = None) -> list[Row]:
    """``atm compare ARGS``: compare's own options; the rest go to every ``atm validate`` run.
    (``atm`` reports a mistake found after parsing in one line, see :mod:`atm_lightning.user_errors`.)"""
    args, passthrough = build_parser().parse_known_args(argv)
    return main(args, passthrough)
