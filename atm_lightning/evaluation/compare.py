"""Dense, a ToMe sweep, ATM operating points and fine-tuned checkpoints: one table, one CSV, one plot.

Every row is an ``atm validate`` run in this process (the same ATMCLI, TokenMergingModule,
ImageNetDataModule and ``Trainer.validate``), so its numbers equal what a single ``atm validate``
with the same options writes to metrics.json; compare takes them, and each image's prediction,
from the module. Options that are not compare's own (``--model.*``, ``--data.*``,
``--trainer.*``) go to every run unchanged, so all rows share images, preprocessing and batch size;
each run's metrics.json and TensorBoard events land under OUTPUT/runs/<row>.

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
from ..merge import NoMerge, TokenMerger, ToMe, to_config
from ..results import METRICS_FILE
from .options import METHOD_HELP, HelpFormatter, parse_method, write_csv
from .plot import plot, require_matplotlib

PASSTHROUGH_PREFIXES = ("--model.", "--data.", "--trainer.", "--seed_everything")
OWN_SETTINGS = ("--model.merger", "--trainer.logger")


@dataclass(frozen=True)
class Run:
    """One row to evaluate: a merger, and for fine-tuned checkpoints their own weights."""

    label: str
    family: str  # dense, ToMe, ATM or checkpoint: one colour each in the plot
    merger: TokenMerger
    weights: str | None = None


@dataclass(frozen=True)
class Row:
    """One evaluated method, as it appears in the table and the CSV."""

    method: str
    family: str
    params: str
    gflops: float
    reduction_pct: float
    top1: float
    top5: float
    agreement_pct: float | None  # top-1 class unchanged from the dense row
    img_per_s: float
    num_images: int
    batch_size: int
    pareto: bool
    metrics: str  # the run's metrics.json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atm compare",
        description=__doc__,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        epilog="Any other option is an `atm validate` option given to every run, e.g. --model.weights W "
        "--data.root R --data.limit 200 --data.batch_size 32 --trainer.accelerator cpu.",
    )
    parser.add_argument("--config", required=True, help="base `atm validate` config, e.g. configs/vit_t.yaml")
    parser.add_argument(
        "--tome_r", type=int, nargs="*", default=[4, 8, 13, 16], metavar="R", help="ToMe merges per block to sweep"
    )
    parser.add_argument(
        "--atm", nargs="*", default=[], metavar="METHOD", help=f"ATM operating points, each {METHOD_HELP}"
    )
    parser.add_argument(
        "--checkpoint",
        nargs="*",
        default=[],
        metavar="NAME=PATH[:METHOD]",
        help="fine-tuned weights evaluated with METHOD (default dense), e.g. ft=runs/ft.ckpt:tome:r=13",
    )
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="folder for the results")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return parser


def main(args: argparse.Namespace, passthrough: list[str]) -> list[Row]:
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config} does not exist; pass an `atm validate` config")
    check_passthrough(passthrough)
    if not args.no_plot:
        require_matplotlib()
    runs = plan(args)
    results = [evaluate(run, args.config, passthrough, args.output) for run in runs]
    rows = to_rows(runs, results)
    args.output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (args.output / "compare.md").write_text(table + "\n")
    write_csv(rows, args.output / "compare.csv")
    if not args.no_plot:
        plot(rows, args.output / "compare.png")
    print(table)
    print(f"\nwrote {args.output}/compare.md, compare.csv" + ("" if args.no_plot else ", compare.png"))
    return rows


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
    runs += [Run(f"ToMe r={r}", "ToMe", ToMe(r=r)) for r in args.tome_r]
    for spec in args.atm:
        method = parse_method(spec)
        family = type(method.merger).__name__  # ATM, or another method given inline (ToMe, EViT)
        runs.append(Run(method.label if spec.endswith((".yaml", ".yml")) else family, family, method.merger))
    runs += [parse_checkpoint(spec) for spec in args.checkpoint]
    return runs


def parse_checkpoint(spec: str) -> Run:
    """``NAME=PATH[:METHOD]`` -> a run of those weights with that method (dense by default)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"cannot read --checkpoint {spec!r}; write NAME=PATH[:METHOD], e.g. ft=ft.ckpt:tome:r=13")
    path, _, method = rest.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--checkpoint {name}: {path} does not exist")
    return Run(name, "checkpoint", parse_method(method or "dense").merger, weights=path)


@dataclass(frozen=True)
class Evaluated:
    """One row's run: the module's results, its images' top-1 classes, and where its files are."""

    results: dict[str, Any]
    predictions: Tensor  # [N] in loader order
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
    cli = run_in_process(args)
    module = cli.model
    path = Path(cli.trainer.log_dir) / METRICS_FILE
    return Evaluated(module.results["val"], module.predictions["val"], cli.datamodule.batch_size, path)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def to_rows(runs: list[Run], evaluated: list[Evaluated]) -> list[Row]:
    dense_predictions = evaluated[0].predictions
    front = pareto_front([(e.results["gflops"], e.results["top1"]) for e in evaluated])
    rows = []
    for i, (run, e) in enumerate(zip(runs, evaluated, strict=True)):
        agreement = None
        if len(e.predictions) == len(dense_predictions):
            agreement = 100 * float((e.predictions == dense_predictions).double().mean())
        rows.append(
            Row(
                method=run.label,
                family=run.family,
                params=describe(run),
                gflops=e.results["gflops"],
                reduction_pct=100 * e.results["flops_reduction"],
                top1=e.results["top1"],
                top5=e.results["top5"],
                agreement_pct=agreement,
                img_per_s=e.results["img_per_s"],
                num_images=e.results["num_images"],
                batch_size=e.batch_size,
                pareto=i in front,
                metrics=str(e.metrics_path),
            )
        )
    return rows


def describe(run: Run) -> str:
    params = {k: v for k, v in run.merger.params().items() if k not in ("method", "prop_attn", "batch_rule")}
    text = " ".join(f"{k}={v}" for k, v in params.items()) or "-"
    return text + (f" ({Path(run.weights).name})" if run.weights else "")


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of (gflops, top1) points that no other point beats on both (fewer FLOPs, more top-1)."""
    return {
        i
        for i, (g, t) in enumerate(points)
        if not any(g2 <= g and t2 >= t and (g2, t2) != (g, t) for g2, t2 in points)
    }


def markdown_table(rows: list[Row]) -> str:
    lines = [
        f"{rows[0].num_images} images, batch size {rows[0].batch_size}; * = on the Pareto front (top-1 vs GFLOPs)",
        "",
        "| method | params | GFLOPs | reduction | top-1 | top-5 | agreement | img/s | |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        agreement = "n/a" if r.agreement_pct is None else f"{r.agreement_pct:.1f}%"
        lines.append(
            f"| {r.method} | {r.params} | {r.gflops:.4g} | {r.reduction_pct:.1f}% | {r.top1:.2f} | "
            f"{r.top5:.2f} | {agreement} | {r.img_per_s:.1f} | {'*' if r.pareto else ''} |"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> list[Row]:
    """``atm compare ARGS``: compare's own options; the rest go to every ``atm validate`` run."""
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    try:
        return main(args, passthrough)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
