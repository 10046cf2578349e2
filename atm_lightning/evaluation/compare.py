"""Dense, ToMe and EViT sweeps, ATM operating points and fine-tuned checkpoints: one table, CSV and plot.

Every row is an ``atm validate`` run in this process (the same ATMCLI, TokenMergingModule,
ImageNetDataModule and ``Trainer.validate``), so its numbers equal what a single ``atm validate``
with the same options writes to metrics.json; compare takes them, and each image's prediction,
from the module. Options that are not compare's own (``--model.*``, ``--data.*``,
``--trainer.*``) go to every run unchanged, so all rows share images, preprocessing and batch size;
each run's metrics.json and TensorBoard events land under OUTPUT/runs/<row>.

Each row is measured against the dense row on the same images: agreement (top-1 class
unchanged), the top-1 change with its 95% paired-bootstrap interval, and the mean KL of the
row's output from its own unmerged model's (for a checkpoint: the unmerged checkpoint). The plot
draws the top-1 change with its interval and the agreement against GFLOPs, one curve per family.
``--sweep`` fills in the ToMe and EViT sweeps that a curve needs.

Example (ViT-Ti weights, 200 images of an ImageNet folder):
    atm compare --config configs/vit_t.yaml --model.weights vit_tiny_patch16_224.safetensors \\
        --data.root IMAGENET --data.limit 200 \\
        --tome_r 4 8 13 16 --atm configs/vit_t_atm.yaml my_atm.yaml --output runs/compare
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..cli import run_in_process
from ..fidelity import top1_change
from ..merge import EViT, NoMerge, TokenMerger, ToMe, to_config
from ..results import METRICS_FILE
from .options import METHOD_HELP, HelpFormatter, parse_method, write_csv
from .plot import plot, require_matplotlib

SWEEP_TOME_R = (2, 4, 6, 8, 10, 12, 13, 14, 16)
SWEEP_EVIT_KEEP = (0.9, 0.8, 0.7, 0.6, 0.5)
PASSTHROUGH_PREFIXES = ("--model.", "--data.", "--trainer.", "--seed_everything")
OWN_SETTINGS = ("--model.merger", "--trainer.logger")


@dataclass(frozen=True)
class Run:
    """One row to evaluate: a merger, and for fine-tuned checkpoints their own weights."""

    label: str
    family: str  # dense, ToMe, EViT, ATM (each also "+ rerun") or checkpoint: one colour each in the plot
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
    top1_change: float | None  # points, against the dense row on the same images
    ci_low: float | None  # 95% paired-bootstrap interval of top1_change
    ci_high: float | None
    lossless: bool | None  # the interval contains 0
    kl: float | None  # mean KL(unmerged || merged), nats per image
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
        help="fine-tuned weights evaluated with METHOD (default dense), e.g. ft=runs/ft.ckpt:tome:r=13",
    )
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="CSV",
        help="evaluate nothing: combine the compare.csv of earlier runs on the same images (same image "
        "count and dense top-1) into one table, CSV and plot; rows of the later files replace same-named ones",
    )
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="folder for the results")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return parser


def main(args: argparse.Namespace, passthrough: list[str]) -> list[Row]:
    if not args.no_plot:
        require_matplotlib()
    if args.merge:
        if passthrough:
            raise ValueError(f"--merge evaluates nothing; drop {' '.join(passthrough)}")
        rows = merge_tables(args.merge)
    else:
        if args.config is None or not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config} does not exist; pass an `atm validate` config")
        check_passthrough(passthrough)
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
    return text + (f" ({Path(run.weights).name})" if run.weights else "")


def merge_tables(paths: list[Path]) -> list[Row]:
    """The rows of several compare.csv files on the same images, dense first, Pareto front redone.

    A later file's row replaces an earlier one of the same label (rows labelled by their family
    alone, as inline methods are, also by their params). Files whose image count or dense top-1
    differ were not measured on the same images: an error.
    """
    rows: dict[tuple[str, str], Row] = {}
    references = set()  # each file's dense row: its image count and top-1
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--merge {path} does not exist; pass compare.csv files of earlier runs")
        with path.open(newline="") as file:
            for record in csv.DictReader(file):
                row = row_from_csv(record)
                rows[(row.method, row.params if row.method == row.family else "")] = row
                if row.family == "dense":
                    references.add((row.num_images, round(row.top1, 6)))
    dense = [r for r in rows.values() if r.family == "dense"]
    others = [r for r in rows.values() if r.family != "dense"]
    counts = {r.num_images for r in others} | {n for n, _ in references}
    if len(references) != 1 or len(counts) != 1:
        raise ValueError("--merge needs files measured on the same images: each with its dense row, same count and top-1")
    merged = [dense[0], *others]
    check_made_alike(merged)
    front = pareto_front([(r.gflops, r.top1) for r in merged])
    return [replace(r, pareto=i in front) for i, r in enumerate(merged)]


# What each row's metrics.json records of how it ran that must be one value in a merged table
# (the weights for dense rows only: a fine-tuned checkpoint row has its own).
MADE_ALIKE = ("model", "img_size", "crop_pct", "interpolation", "hflip")


def check_made_alike(rows: list[Row]) -> None:
    """Refuse rows that ran with another batch size or preprocessing: their throughput, or their
    top-1 on the same images, would not compare. Rows whose metrics.json is gone are checked on
    their batch size alone."""
    seen: dict[str, dict[Any, str]] = {}
    for row in rows:
        settings: dict[str, Any] = {"batch_size": row.batch_size}
        metrics = Path(row.metrics)
        if metrics.is_file():
            recorded = json.loads(metrics.read_text())
            keys = (*MADE_ALIKE, "weights") if row.family == "dense" else MADE_ALIKE
            settings |= {key: recorded.get(key) for key in keys}
        for key, value in settings.items():
            seen.setdefault(key, {}).setdefault(json.dumps(value), row.method)
    differ = {key: values for key, values in seen.items() if len(values) > 1}
    if differ:
        detail = "; ".join(
            f"{key} " + ", ".join(f"{value} ({method})" for value, method in values.items())
            for key, values in differ.items()
        )
        raise ValueError(f"--merge needs runs made alike, but they differ in {detail}; rerun the odd ones alike")


def row_from_csv(record: dict[str, str]) -> Row:
    """A :class:`Row` from its CSV line (empty cells: not measured)."""
    values: dict[str, Any] = {}
    for name, kind in ((f.name, f.type) for f in fields(Row)):
        text = record[name]
        if "bool" in kind:
            values[name] = None if text == "" else text == "True"
        elif "float" in kind:
            values[name] = None if text == "" else float(text)
        elif "int" in kind:
            values[name] = int(text)
        else:
            values[name] = text
    return Row(**values)


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of (gflops, top1) points that no other point beats on both (fewer FLOPs, more top-1)."""
    return {
        i
        for i, (g, t) in enumerate(points)
        if not any(g2 <= g and t2 >= t and (g2, t2) != (g, t) for g2, t2 in points)
    }


def markdown_table(rows: list[Row]) -> str:
    lines = [
        f"{rows[0].num_images} images, batch size {rows[0].batch_size}; top-1 change against dense with its 95% "
        "paired-bootstrap interval; KL to the unmerged model (nats); * = on the Pareto front (top-1 vs GFLOPs)",
        "",
        "| method | params | GFLOPs | reduction | top-1 | change [95% CI] | agreement | KL | top-5 | img/s | |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        agreement = "n/a" if r.agreement_pct is None else f"{r.agreement_pct:.1f}%"
        change = "n/a" if r.top1_change is None else f"{r.top1_change:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        kl = "n/a" if r.kl is None else f"{r.kl:.4f}"
        lines.append(
            f"| {r.method} | {r.params} | {r.gflops:.4g} | {r.reduction_pct:.1f}% | {r.top1:.2f} | {change} | "
            f"{agreement} | {kl} | {r.top5:.2f} | {r.img_per_s:.1f} | {'*' if r.pareto else ''} |"
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
