"""The distillation study: training-free against distilled merging, on held-out images and copies.

    python tools/distill_study.py IMAGES WEIGHTS OUT [grid options]

IMAGES: class folders of labelled images (ImageNet wnids for a 1000-class head); WEIGHTS: the
base weights (ViT-Ti/16 by default). The images are split in two (tools/holdout_split.py,
``--split-seed``). For each FLOPs target, ATM is calibrated on the training half (or taken
from ``--atm-config``) and ToMe gets the r whose GFLOPs come closest to ATM's on that half.
Each configuration of the grid then distils its point with ``atm fit --model.distill`` on the
first N images of the training half (a seeded draw, nested: the 125 are among the 250); where
the distilled model's ATM saving on the training half moved by more than ``--tolerance``, ATM
is calibrated again with the delta (``--recalibrate``). Every point, training-free
(``trainable`` none) and distilled, is evaluated with ``atm validate`` against the dense base
model on the held-out half as it is, mirrored, and with the whole image as crop.

One JSON line per configuration goes to OUT/results.jsonl, with the minutes each stage took;
OUT/results.md tabulates them. Configurations already there are skipped: a stopped study goes
on where it stopped when run again with the same command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml

from atm_lightning import ToMe, merge_stats, patch
from atm_lightning.cli import run_in_process
from atm_lightning.merge import to_config
from atm_lightning.models import create_model
from atm_lightning.threads import available_cpus

REPO = Path(__file__).resolve().parents[1]
VIEWS = {"as_is": [], "mirrored": ["--data.eval_hflip", "true"], "crop1": ["--data.crop_pct", "1.0"]}
AUGMENT = {  # --data/--model options of each augmentation preset for the distillation images
    "light": ["--data.auto_augment", "null", "--data.re_prob", "0", "--data.color_jitter", "0", "--data.crop_scale", "[0.35, 1.0]"],
    "deit": [],  # the DataModule's defaults: RandAugment m9, random erasing 0.25, crops of 8-100% of the area
    "mix": ["--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0"],  # deit, plus mixup/cutmix
}
RESULT_FIELDS = ("flops_reduction", "agreement", "kl", "top1", "top1_dense", "top1_change", "top1_change_ci95", "rerun_fraction")


@dataclass(frozen=True)
class Config:
    """One row of the study: a point (method at a target) and how it was distilled (none: training-free)."""

    method: str
    target: float
    trainable: str = "none"
    images: int = 0
    steps: int = 0
    lr: float = 0.0
    batch_size: int = 0
    temperature: float = 1.0
    augment: str = "-"
    lora_rank: int = 0
    weight_decay: float = 0.0
    warmup: float = 0.0
    ema: float = 0.0
    seed: int = 0

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def name(self) -> str:
        if self.trainable == "none":
            return f"{self.method}_{self.target:g}"
        parts = (self.method, f"{self.target:g}", self.trainable, f"n{self.images}", f"s{self.steps}", f"lr{self.lr:g}",
                 f"b{self.batch_size}", f"T{self.temperature:g}", self.augment, f"r{self.lora_rank}",
                 f"wd{self.weight_decay:g}", f"w{self.warmup:g}", f"ema{self.ema:g}", f"seed{self.seed}")  # fmt: skip
        return "_".join(parts).replace("+", "-")


def run_atm(args: list[str], threads: int | None) -> None:
    """``atm ARGS`` of this checkout in a child process (its memory and threads end with it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    threads_args = ["--threads", str(threads)] if threads else []
    subprocess.run([sys.executable, "-m", "atm_lightning.cli", *args, *threads_args], check=True, env=env, cwd=REPO)


def link_images(paths: list[Path], folder: Path) -> None:
    for path in paths:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / path.parent.name / path.name).symlink_to(path.resolve())


def subset(split: Path, count: int, out: Path) -> Path:
    """A data root whose train/ holds the first ``count`` of a seeded permutation of the training
    half (nested across counts) and whose val/ is the held-out half (fit sets it up, never reads it)."""
    root = out / "subsets" / f"n{count}"
    if not root.exists():
        images = sorted(split.glob("train/*/*"))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
        link_images([images[i] for i in order[:count]], root / "train")
        (root / "val").symlink_to((split / "val").resolve())
    return root


def validate(config: Path, weights: str, root: Path, out: Path, extra: list[str], delta: Path | None = None) -> dict:
    """``atm validate`` in this process; its results against the dense base model."""
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(out), "name": "validate", "default_hp_metric": False}}  # fmt: skip
    args = ["validate", "--config", str(config), "--model.weights", weights, "--data.root", str(root),
            "--trainer.callbacks", "[]", "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", *extra]  # fmt: skip
    if delta is not None:
        args += ["--model.delta", str(delta)]
    return run_in_process(args).model.results["val"]


def tome_config(atm_config: Path, reduction: float, out: Path) -> tuple[Path, int]:
    """ToMe (class-token-only last block) with the r whose saving is closest to ``reduction``, as a
    copy of the ATM config; ToMe's FLOPs do not depend on the image."""
    config = yaml.safe_load(atm_config.read_text())
    settings = config["model"]
    model = create_model(settings["model_name"], num_classes=settings.get("num_classes", 1000),
                         model_kwargs=settings.get("model_kwargs")).eval()  # fmt: skip
    savings = {}
    with torch.inference_mode():
        for r in range(1, model.patch_embed.num_patches // 2):
            patch(model, ToMe(r=r, last_block_prefix_only=True))(torch.zeros(1, 3, *model.patch_embed.img_size))
            savings[r] = float(merge_stats(model).flops_reduction[0])
    r = min(savings, key=lambda k: abs(savings[k] - reduction))
    config["model"]["merger"] = to_config(ToMe(r=r, last_block_prefix_only=True))
    config["trainer"]["logger"]["init_args"]["name"] = f"vit_t_tome_r{r}"
    path = out / f"tome_r{r}.yaml"
    path.write_text(f"# ToMe r={r}: {100 * savings[r]:.1f}% fewer GFLOPs, ATM {100 * reduction:.1f}% on the training half\n"
                    + yaml.safe_dump(config, sort_keys=False))  # fmt: skip
    return path, r


def distill(config: Config, point: Path, weights: str, split: Path, out: Path, opts: argparse.Namespace) -> Path:
    """``atm fit --model.distill`` of ``point`` on the configuration's images; the delta file."""
    run = out / "runs" / config.name
    delta = run / "delta.safetensors"
    args = [
        "fit", "--config", str(point), "--model.weights", weights, "--data.root", str(subset(split, config.images, out)),
        "--model.distill.trainable", config.trainable, "--model.distill.temperature", str(config.temperature),
        "--model.distill.lora_rank", str(max(1, config.lora_rank)), "--model.distill.delta", str(delta),
        "--model.lr", str(config.lr), "--model.lr_base_batch", "null", "--model.weight_decay", str(config.weight_decay),
        "--model.warmup_steps", str(round(config.warmup * config.steps)), "--trainer.max_steps", str(config.steps),
        "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.logger.init_args.save_dir", str(run), "--data.batch_size", str(config.batch_size),
        "--data.num_workers", str(opts.workers), "--seed_everything", str(config.seed), *AUGMENT[config.augment],
    ]  # fmt: skip
    if config.ema:
        args += ["--trainer.callbacks+=atm_lightning.callbacks.EMA", "--trainer.callbacks.decay", str(config.ema)]
    run_atm(args, opts.threads)
    return delta


def evaluate(config: Config, point: Path, opts: argparse.Namespace, split: Path, out: Path, reference: dict) -> dict:
    """Distil (unless training-free), recalibrate if the merges moved, evaluate every view."""
    row, started = {**asdict(config)}, time.perf_counter()
    common = ["--data.num_workers", str(opts.workers)] + (["--threads", str(opts.threads)] if opts.threads else [])
    delta = None
    if config.trainable != "none":
        delta = distill(config, point, opts.weights, split, out, opts)
        row["minutes_distill"] = (time.perf_counter() - started) / 60
        row["delta_kb"] = delta.stat().st_size / 1024
    on_train = ["--data.val_split", "train", "--model.fidelity", "false", *common]
    started = time.perf_counter()
    if config.method == "atm":  # ToMe's saving does not depend on the weights
        before = reference[config.method, config.target]
        row["train_reduction"] = before if delta is None else validate(point, opts.weights, split, out / "eval", on_train, delta)["flops_reduction"]
        moved = abs(row["train_reduction"] - before) > opts.tolerance
        row["recalibrated"] = delta is not None and (opts.recalibrate == "always" or (opts.recalibrate == "auto" and moved))
    if row.get("recalibrated"):
        recalibrated = delta.parent / "recalibrated.yaml"
        run_atm(["calibrate", "--config", str(point), "--model.weights", opts.weights, "--model.delta", str(delta),
                 "--data.root", str(split), "--target_reduction", str(config.target), "--num_images", str(opts.train_images),
                 "--output", str(recalibrated), "--overwrite", "true", "--data.num_workers", str(opts.workers)], opts.threads)  # fmt: skip
        point = recalibrated
        row["train_reduction_recalibrated"] = validate(point, opts.weights, split, out / "eval", on_train, delta)["flops_reduction"]
    row["minutes_recalibrate"] = (time.perf_counter() - started) / 60
    started = time.perf_counter()
    for view in opts.views:
        results = validate(point, opts.weights, split, out / "eval", [*VIEWS[view], *common], delta)
        row[view] = {key: results[key] for key in RESULT_FIELDS}
        if opts.merged_only:
            alone = validate(point, opts.weights, split, out / "eval", [*VIEWS[view], *common, "--model.merger.rerun_margin", "0"], delta)
            row[f"{view}_merged_only"] = {key: alone[key] for key in RESULT_FIELDS}
    row["minutes_evaluate"] = (time.perf_counter() - started) / 60
    row["config"], row["delta"] = str(point), str(delta) if delta else None
    return row


def table(rows: list[dict], views: list[str]) -> str:
    views = [v for view in views for v in (view, f"{view}_merged_only") if any(v in r for r in rows)]
    head = "| method | target | trained | images | steps | lr | aug | T | " + " | ".join(
        f"{v}: saved, agreement, KL, change [CI]" for v in views) + " | minutes |"  # fmt: skip
    lines = [head, "|" + "---|" * (9 + len(views))]
    for r in rows:
        cells = []
        for view in views:
            v = r.get(view)
            cells.append("-" if v is None else f"{100 * v['flops_reduction']:.1f}%, {v['agreement']:.1f}%, {v['kl']:.4f}, "
                         f"{v['top1_change']:+.1f} [{v['top1_change_ci95'][0]:+.1f}, {v['top1_change_ci95'][1]:+.1f}]")  # fmt: skip
        minutes = sum(r.get(k, 0) for k in ("minutes_distill", "minutes_recalibrate", "minutes_evaluate"))
        lines.append(f"| {r['method']} | {r['target']:g} | {r['trainable']} | {r['images']} | {r['steps']} | {r['lr']:g} | "
                     f"{r['augment']} | {r['temperature']:g} | " + " | ".join(cells) + f" | {minutes:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="class folders of labelled images, e.g. a 1000-image ImageNet sample")
    parser.add_argument("weights", help="base weights (.safetensors/.pth)")
    parser.add_argument("out", type=Path, help="folder for the split, the runs and the results (reused to resume)")
    grid = parser.add_argument_group("grid (every combination is one configuration)")
    grid.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5])
    grid.add_argument("--methods", nargs="+", default=["atm", "tome"], choices=["atm", "tome"])
    grid.add_argument("--trainable", nargs="+", default=["norms_biases", "lora"])
    grid.add_argument("--num-images", type=int, nargs="+", default=[125, 250, 500], help="distillation images")
    grid.add_argument("--steps", type=int, nargs="+", default=[150])
    grid.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    grid.add_argument("--batch-size", type=int, nargs="+", default=[32])
    grid.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    grid.add_argument("--augment", nargs="+", default=["light"], choices=sorted(AUGMENT))
    grid.add_argument("--lora-rank", type=int, nargs="+", default=[8])
    grid.add_argument("--weight-decay", type=float, nargs="+", default=[0.0])
    grid.add_argument("--warmup", type=float, nargs="+", default=[0.1], help="share of the steps")
    grid.add_argument("--ema", type=float, nargs="+", default=[0.0], help="EMA decay (0: none)")
    grid.add_argument("--seed", type=int, nargs="+", default=[0], help="seed_everything of the distillation")
    parser.add_argument("--atm-config", nargs="*", default=[], metavar="TARGET=YAML", help="use this ATM config for a target")
    parser.add_argument("--model-config", default=str(REPO / "configs" / "vit_t_dense.yaml"), help="what calibrate starts from")
    parser.add_argument("--views", nargs="+", default=list(VIEWS), choices=list(VIEWS))
    parser.add_argument("--merged-only", action="store_true", help="also evaluate each view without reruns")
    parser.add_argument("--recalibrate", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--tolerance", type=float, default=0.01, help="a saving that moved more than this recalibrates")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=available_cpus(),
                        help="torch threads of each run (default: every core; training is compute-bound)")
    opts = parser.parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    split = opts.out / "split"
    if not split.exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "holdout_split.py"), str(opts.images), str(split),
                        "--seed", str(opts.split_seed)], check=True)  # fmt: skip
    opts.train_images = len(list(split.glob("train/*/*")))
    given = {float(t): Path(p).resolve() for t, _, p in (spec.partition("=") for spec in opts.atm_config)}
    points: dict[tuple[str, float], Path] = {}
    reference: dict[tuple[str, float], float] = {}  # the training-free saving on the training half
    savings = opts.out / "train_savings.json"  # kept, so that a resumed study does not measure them again
    known = json.loads(savings.read_text()) if savings.exists() else {}
    common = ["--data.num_workers", str(opts.workers)] + (["--threads", str(opts.threads)] if opts.threads else [])
    for target in opts.targets:
        atm = given.get(target, opts.out / f"atm_{100 * target:g}.yaml")
        if not atm.exists():
            run_atm(["calibrate", "--config", opts.model_config, "--model.weights", opts.weights, "--data.root", str(split),
                     "--target_reduction", str(target), "--num_images", str(opts.train_images), "--output", str(atm),
                     "--data.num_workers", str(opts.workers)], opts.threads)  # fmt: skip
        on_train = ["--data.val_split", "train", "--model.fidelity", "false", *common]
        if str(atm) not in known:
            known[str(atm)] = validate(atm, opts.weights, split, opts.out / "eval", on_train)["flops_reduction"]
            savings.write_text(json.dumps(known, indent=1))
        reference["atm", target] = known[str(atm)]
        points["atm", target] = atm
        if "tome" in opts.methods:
            points["tome", target], _ = tome_config(atm, reference["atm", target], opts.out)
    results = opts.out / "results.jsonl"
    done = {json.loads(line)["key"] for line in results.read_text().splitlines()} if results.exists() else set()
    configs = [Config(m, t) for m, t in itertools.product(opts.methods, opts.targets)]
    for combo in itertools.product(opts.methods, opts.targets, opts.trainable, opts.num_images, opts.steps, opts.lr,
                                   opts.batch_size, opts.temperature, opts.augment, opts.lora_rank, opts.weight_decay,
                                   opts.warmup, opts.ema, opts.seed):  # fmt: skip
        config = Config(*combo)
        configs.append(replace(config, lora_rank=config.lora_rank if "lora" in config.trainable else 0))
    for config in dict.fromkeys(configs):
        if config.key in done:
            continue
        print(f"--- {config.name}", flush=True)
        row = evaluate(config, points[config.method, config.target], opts, split, opts.out, reference)
        with results.open("a") as file:
            file.write(json.dumps({"key": config.key, **row}) + "\n")
        done.add(config.key)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    text = table(rows, opts.views)
    (opts.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
