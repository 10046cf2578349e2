"""``atm calibrate``: :func:`.run.calibrate` as a Trainer method LightningCLI exposes, writing a config.

The written YAML is the parsed command line with the calibrated merger in it, so ``atm validate
--config OUTPUT --data.root R`` runs it as is. The ``atm`` CLI passes that parsed config as
``base_config``; called from Python without it, the file holds the model and data settings only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer

from ..data import ImageNetDataModule
from ..merge import ATM, to_config
from ..module import TokenMergingModule
from ..runs import check_new_file
from ..user_errors import CommandError
from .run import calibrate, check_calibrate_args, default_rerun_fraction, draw_samples, starting_merger
from .search import Calibration, candidate_shapes, unreached_message

# Options of the calibrate subcommand itself, left out of the written config.
CALIBRATE_OPTIONS = (
    "target_reduction", "tolerance", "num_images", "seed", "use_labels", "output", "overwrite",
    "split_layers", "decay_layers", "alpha_drops", "max_evals", "rerun_fraction",
)


class CalibrationTrainer(Trainer):
    """Lightning's Trainer plus ``calibrate``, which LightningCLI exposes as ``atm calibrate``."""

    def calibrate(
        self,
        model: TokenMergingModule,
        datamodule: ImageNetDataModule,
        target_reduction: float = 0.3,
        tolerance: float = 0.01,
        num_images: int = 1000,
        seed: int = 0,
        use_labels: bool = False,
        output: str = "calibrated.yaml",
        overwrite: bool = False,
        split_layers: list[int] | None = None,
        decay_layers: list[int] | None = None,
        alpha_drops: list[float] | None = None,
        max_evals: int = 8,
        rerun_fraction: float | None = None,
        base_config: dict[str, Any] | None = None,
    ) -> Calibration:
        """Find ATM thresholds that save target_reduction of the FLOPs while changing predictions least.

        Reads training images (data.train_split) with the eval transform, never the val split.

        Args:
            model: the model to calibrate; its merger's batch_rule and prop_attn are kept.
            datamodule: where the training images and their preprocessing come from.
            target_reduction: fraction of the dense model's mean GFLOPs to save, e.g. 0.3.
            tolerance: accepted distance from the target, as a fraction (0.01 = 1 percentage point).
            num_images: training images to calibrate on, drawn at random with ``seed``.
            seed: which training images are drawn.
            use_labels: also score top-1 accuracy, and pick the most accurate point (KL breaks ties).
            output: YAML config to write, usable as ``atm validate --config OUTPUT --data.root R``.
            overwrite: replace ``output`` if it exists (otherwise an existing file is an error).
            split_layers: candidate ATM split layers (1-indexed); default: depth-2 and depth-1.
            decay_layers: candidate blocks where the threshold reaches its floor; default: depth-2.
            alpha_drops: candidate first thresholds, as alpha = 1 - alpha_drop * (1 - theta_min);
                default: 0 (block 1 merges only exact duplicates) and 0.5; 0 only with
                class-attention weighting (attention_power > 0).
            max_evals: evaluations allowed per schedule shape.
            rerun_fraction: fraction of the calibration images whose merged prediction is least
                certain and that run again unmerged (sets the merger's rerun_margin; the FLOPs
                target counts the second pass). Default: 0.1 for targets up to 0.3, falling to 0.05
                at 0.4 and above; 0 when the config's merger is an ATM without rerun_margin.
            base_config: the config the written file starts from (the CLI passes its own).
        """
        if rerun_fraction is None:
            rerun_fraction = default_rerun_fraction(model, target_reduction)
        check_calibrate_args(target_reduction, tolerance, num_images, max_evals, rerun_fraction)
        check_output(Path(output), overwrite, self.world_size)
        started = time.perf_counter()
        strict = starting_merger(model).attention_power > 0
        shapes = candidate_shapes(len(model.model.blocks), split_layers, decay_layers, alpha_drops, strict)
        samples = draw_samples(datamodule, num_images, seed, labels_needed=use_labels)
        result = calibrate(
            model, datamodule, samples, shapes, target=target_reduction, tolerance=tolerance, max_evals=max_evals,
            use_labels=use_labels, rerun_fraction=rerun_fraction, device=self.strategy.root_device, progress=self.progress_bar_callback is not None,
        )  # fmt: skip
        if result.best is None:
            raise CommandError(unreached_message(result))
        seconds = time.perf_counter() - started
        # Shown before writing: a search that cannot be written is still not lost.
        print(f"chosen: {result.best.describe()}\nmerger: {to_config(result.best.merger)}")
        comment = header(result, f"{datamodule.root / datamodule.train_split} (seed {seed})", seconds)
        write_calibrated_config(Path(output), comment, base_config or minimal_config(model, datamodule), result.best.merger)
        print(f"wrote {output} ({seconds:.0f} s)")
        return result


def check_output(output: Path, overwrite: bool, world_size: int) -> None:
    """Fail before any image is read when the result could not be written or would be wrong."""
    check_new_file(output, overwrite, example="calibrated.yaml")
    if world_size > 1:
        raise ValueError("calibrate runs on one device; set --trainer.devices 1")


def calibrated_config(base: dict[str, Any], merger: ATM) -> dict[str, Any]:
    """The parsed config as ``atm validate`` takes it: the calibrated merger, no data root, no
    calibrate-only options, and an absolute weights path so the file works from any directory."""
    config = {key: value for key, value in base.items() if key not in CALIBRATE_OPTIONS}
    model = dict(config.get("model") or {})
    if model.get("weights"):
        model["weights"] = str(Path(model["weights"]).expanduser().resolve())
    model["merger"] = to_config(merger)
    config["model"] = model
    data = dict(config.get("data") or {})
    data.pop("root", None)
    config["data"] = data
    return config


def header(result: Calibration, images: str, seconds: float) -> str:
    """The YAML comment block recording where the operating point came from and what it did."""
    best = result.best
    assert best is not None
    when = time.strftime("%Y-%m-%d %H:%M")
    dense = f"dense: {result.dense_gflops:.4g} GFLOPs"
    if result.dense_top1 is not None:
        dense += f", top-1 {100 * result.dense_top1:.1f}%"
    target = f"{100 * result.target:.1f}% +- {100 * result.tolerance:.1f} pp"
    lines = [
        f"Calibrated by `atm calibrate` on {when}: {result.num_images} images of {images}",
        f"target FLOPs reduction {target}; {len(result.points)} schedules evaluated in {seconds:.0f} s",
        f"chosen, on those images: {best.describe()}",
        dense,
        "Evaluate on held-out images: atm validate --config THIS_FILE --data.root DATASET",
    ]
    if best.merger.rerun_margin > 0:
        lines.append(
            f"{100 * best.rerun:.1f}% of these images ran again; of images the model is less sure of, more "
            "will (rerun_fraction in metrics.json), and the saving will be smaller"
        )
    return "".join(f"# {line}\n" for line in lines)


def write_calibrated_config(path: Path, comment: str, base: dict[str, Any], merger: ATM) -> None:
    """Write the config with its provenance as a comment header."""
    config = calibrated_config(base, merger)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comment + yaml.safe_dump(config, sort_keys=False))


def minimal_config(module: TokenMergingModule, datamodule: ImageNetDataModule) -> dict[str, Any]:
    """Model and preprocessing settings, for calls from Python without the CLI's parsed config."""
    model = {key: value for key, value in module.hparams.items() if key != "merger"}
    data_config = datamodule.data_config
    data = {
        "batch_size": datamodule.batch_size,
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "img_size": data_config["input_size"][-1],
    }
    return {"model": model, "data": data}
