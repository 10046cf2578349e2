"""The researcher's workflow end to end, offline, in a few minutes on 2 CPU cores (``make demo``).

1. Write scikit-learn's 1797 handwritten digits as an ImageFolder, each digit on a blank canvas.
2. ``atm fit`` a small ViT on the training split (configs/demo/digits_vit.yaml).
3. ``atm fit`` it a few epochs more with ToMe merging active: the trained baseline (ToMe-ft).
4. ``atm calibrate`` ATM on the *training* images for a FLOPs target (no reruns: see ``calibrate``).
5. ``atm compare``: dense, ToMe off the shelf, ToMe-ft and the training-free calibrated ATM on
   the val images: table, CSV, plot.

ATM's thresholds merge the uniform background, so it saves FLOPs where ToMe, which merges a fixed
count in every image, has to start merging strokes. Everything is written under OUTPUT; each step
prints the shell command it runs in-process.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import torch
from digits_data import write_digits

from atm_lightning.cli import run_in_process
from atm_lightning.evaluation.compare import Row
from atm_lightning.evaluation.compare import cli as compare_cli
from atm_lightning.evaluation.options import HelpFormatter
from atm_lightning.merge import ToMe, to_spec

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "digits_vit.yaml"
FAST = {"limit": None, "epochs": 5, "ft_epochs": 2, "ft_r": 12, "calibration_images": 200, "tome_r": ["8", "12"]}
FULL = {
    "limit": None,
    "epochs": 15,
    "ft_epochs": 3,
    "ft_r": 16,
    "calibration_images": 600,
    "tome_r": ["4", "8", "12", "16"],
}
# Fine-tuning from the trained model: a lower peak lr than from scratch, and no proportional
# attention while training, as ToMe advises (the same setting is used to evaluate it).
FT_LR = "5e-4"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/demo.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="folder for data, runs and results")
    parser.add_argument("--fast", action="store_true", help="5 epochs, fewer calibration images and ToMe points: the test suite's variant")
    parser.add_argument("--target", type=float, default=0.6, help="ATM's FLOPs reduction target for calibrate")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: all cores, or 1 when other processes load them)"
    )
    return parser


def main(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads or default_threads())
    plan = FAST if args.fast else FULL
    out = args.output
    counts = write_digits(out / "digits", limit=plan["limit"])
    print(f"wrote {counts['train']} training and {counts['val']} val digits to {out / 'digits'}")
    common = ["--config", str(CONFIG), "--data.root", str(out / "digits"), "--trainer.enable_progress_bar", "false"]
    checkpoint = fit(common, out, plan["epochs"])
    tome_ft = fit(common, out, plan["ft_epochs"], name="digits_vit_tome_ft", extra=tome_ft_args(checkpoint, plan["ft_r"]))
    calibrated = out / "digits_atm.yaml"
    calibrate(common, checkpoint, calibrated, args.target, plan["calibration_images"])
    compare_args = [
        *common,
        "--model.weights",
        checkpoint,
        "--tome_r",
        *plan["tome_r"],
        "--atm",
        str(calibrated),
        "--checkpoint",
        f"tome_ft_r{plan['ft_r']}={tome_ft}:{to_spec(ToMe(r=plan['ft_r'], prop_attn=False))}",
        "--output",
        str(out / "compare"),
    ]
    announce("atm compare", compare_args)
    return compare_cli(compare_args)


def default_threads() -> int:
    """All cores on an idle machine; one when others keep them busy (OpenMP spin-waits then cost most)."""
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores - 0.5 else cores


def fit(common: list[str], out: Path, epochs: int, name: str = "digits_vit", extra: tuple[str, ...] = ()) -> str:
    """Train the small ViT (or fine-tune it, with ``extra`` settings); returns its checkpoint."""
    args = ["fit", *common, "--trainer.max_epochs", str(epochs), *extra]
    args += ["--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name", name]
    announce("atm", args)
    cli = run_in_process(args)
    top1 = cli.model.results["val"]["top1"]
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    print(f"trained: val top-1 {top1:.1f}% after {epochs} epochs; checkpoint {checkpoint}")
    return checkpoint


def tome_ft_args(checkpoint: str, r: int) -> tuple[str, ...]:
    """Fine-tune ``checkpoint`` with ToMe r merges per block active."""
    return ("--model.weights", checkpoint, "--model.merger", "ToMe", "--model.merger.r", str(r),
            "--model.merger.prop_attn", "false", "--model.lr", FT_LR, "--model.warmup_steps", "0")


def calibrate(common: list[str], checkpoint: str, output: Path, target: float, num_images: int) -> None:
    """ATM's operating point for the trained model, from its training images.

    Without reruns: the model is surer of the images it was trained on than of new ones, so a
    rerun margin set on them reruns far more than its share of the val images (5% of the training
    images, 7-13% of val in two training runs) and the saving falls short of the target.
    """
    args = ["calibrate", *common, "--model.weights", checkpoint, "--target_reduction", str(target)]
    args += ["--num_images", str(num_images), "--rerun_fraction", "0", "--output", str(output)]
    announce("atm", args)
    run_in_process(args)


def announce(program: str, args: list[str]) -> None:
    print(f"\n$ {program} {shlex.join(args)}", flush=True)


def cli(argv: list[str] | None = None) -> list[Row]:
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
