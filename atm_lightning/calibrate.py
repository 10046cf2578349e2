"""``atm calibrate``: find ATM's operating point for any model from training images, without training.

ATM's thresholds are per model (spec §2.4), and the images a number is reported on must not choose
them. So calibration reads the *training* split through the *eval* transform, runs the dense model
once, and caches its log-probabilities and the preprocessed images. Each candidate schedule then
costs one merged forward pass over the cache, scored by how little it changes the dense model:
KL(dense || merged) averaged over images (label-free), with top-1 agreement beside it.

The search space is one-dimensional per schedule *shape*. A shape fixes ``split_layer``, the block
where the threshold decays to its floor (``decay_layer``) and how far block 1's threshold sits below
1 (``alpha_drop``). The *level* is the gap ``1 - theta_min``; ``alpha = 1 - alpha_drop * gap`` and
``beta = ln(1 + alpha - theta_min) / (decay_layer - 1)`` follow from it, so every block's threshold
falls as the gap grows and the FLOPs reduction rises with it. The level is solved in log space
(pretrained ViTs want gaps near 0.2, random ones near 0.005) by secant steps, for a few shapes; the
point with the lowest KL among those within the tolerance of the target wins.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Trainer
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import ImageListDataset, ImageNetDataModule
from .data.datasets import Sample
from .data.transforms import eval_transform
from .merge import ATM, NoMerge, to_config
from .module import TokenMergingModule
from .patch import merge_stats, patch

# Bounds of the level, log(1 - theta_min): theta_min from 0.99999 (nearly nothing merges) to -1
# (every source merges once the threshold has decayed).
LOG_GAP_BOUNDS = (math.log(1e-5), math.log(2.0))
FIRST_LOG_GAP = math.log(0.2)  # where pretrained ViTs land for ~30 % reduction
FIRST_SLOPE = 0.3  # reduction gained per unit of log gap, ViT-Ti near 30 %
# Options of the calibrate subcommand itself, left out of the written config.
CALIBRATE_OPTIONS = (
    "target_reduction", "tolerance", "num_images", "seed", "use_labels", "output", "overwrite",
    "split_layers", "decay_layers", "alpha_drops", "max_evals",
)


@dataclass(frozen=True)
class Shape:
    """A schedule family: everything but the level."""

    split_layer: int  # first block (1-indexed) with the size-sorted split
    decay_layer: int  # block (1-indexed) whose threshold first reaches theta_min
    alpha_drop: float  # alpha = 1 - alpha_drop * gap: 0 keeps block 1 strict, more merges there too

    def merger(self, log_gap: float, base: ATM) -> ATM:
        """The ATM policy of this shape at level ``log_gap``, rounded to readable values."""
        gap = math.exp(log_gap)
        alpha = round(1.0 - self.alpha_drop * gap, 5)
        theta_min = min(alpha, round(1.0 - gap, 5))
        beta = max(0.0, float(f"{math.log(1.0 + alpha - theta_min) / (self.decay_layer - 1):.4g}"))
        return ATM(
            alpha=alpha,
            beta=beta,
            theta_min=theta_min,
            split_layer=self.split_layer,
            batch_rule=base.batch_rule,
            prop_attn=base.prop_attn,
        )




@dataclass(frozen=True)
class Point:
    """One evaluated schedule on the calibration images."""

    merger: ATM
    reduction: float  # fraction of dense GFLOPs saved
    kl: float  # mean KL(dense || merged) in nats
    agreement: float  # fraction of images whose top-1 class is unchanged
    top1: float | None  # fraction correct, with use_labels

    def describe(self) -> str:
        m = self.merger
        text = (
            f"alpha={m.alpha:.5g} beta={m.beta:.4g} theta_min={m.theta_min:.5g} split_layer={m.split_layer}: "
            f"reduction {100 * self.reduction:.1f}%  KL {self.kl:.4f}  agreement {100 * self.agreement:.1f}%"
        )
        return text + (f"  top-1 {100 * self.top1:.1f}%" if self.top1 is not None else "")


@dataclass
class CalibrationSet:
    """Preprocessed training images with the dense model's outputs, cached for the whole search."""

    batches: list[Tensor]
    labels: Tensor
    dense_log_probs: Tensor  # [N, C]
    dense_gflops: float

    @property
    def num_images(self) -> int:
        return len(self.labels)


@dataclass
class Calibration:
    """Every point the search evaluated and the one it chose."""

    target: float
    tolerance: float
    points: list[Point] = field(default_factory=list)
    best: Point | None = None
    dense_top1: float | None = None


def calibration_samples(datamodule: ImageNetDataModule, num_images: int, seed: int) -> list[Sample]:
    """``num_images`` labelled training images, drawn with ``seed`` (all of them if there are fewer)."""
    try:
        samples = datamodule._folder_split(datamodule.train_split)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. Calibration chooses thresholds on training images, never on the images you report: "
            f"point --data.train_split at the subfolder of --data.root that holds them"
        ) from None
    if num_images < len(samples):
        samples = random.Random(seed).sample(samples, num_images)
    elif num_images > len(samples):
        print(
            f"warning: --num_images {num_images} asked for more images than the {len(samples)} in "
            f"{datamodule.root / datamodule.train_split}; calibrating on all {len(samples)}",
            file=sys.stderr,
        )
    return samples


def load_calibration_set(
    module: TokenMergingModule,
    datamodule: ImageNetDataModule,
    samples: list[Sample],
    device: torch.device,
    progress: bool,
) -> CalibrationSet:
    """Decode the images once (eval transform: no augmentation) and run the dense model on them."""
    dataset = ImageListDataset(samples, eval_transform(datamodule.data_config))
    loader = DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=datamodule.workers)
    model = patch(module.model, NoMerge())
    batches, labels, log_probs = [], [], []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="dense pass", disable=not progress, leave=False):
            images = images.to(device)
            batches.append(images)
            labels.append(targets)
            log_probs.append(F.log_softmax(model(images).double(), dim=-1).cpu())
    return CalibrationSet(batches, torch.cat(labels), torch.cat(log_probs), merge_stats(model).gflops_dense)


def evaluate(module: TokenMergingModule, cal: CalibrationSet, merger: ATM, use_labels: bool) -> Point:
    """Reduction, KL and agreement of ``merger`` against the cached dense outputs."""
    model = patch(module.model, merger)
    gflops, log_probs = [], []
    with torch.inference_mode():
        for images in cal.batches:
            log_probs.append(F.log_softmax(model(images).double(), dim=-1).cpu())
            gflops.append(merge_stats(model).gflops.cpu())
    merged = torch.cat(log_probs)
    dense = cal.dense_log_probs
    kl = (dense.exp() * (dense - merged)).sum(-1).mean()
    predictions = merged.argmax(-1)
    return Point(
        merger=merger,
        reduction=1.0 - float(torch.cat(gflops).mean()) / cal.dense_gflops,
        kl=float(kl),
        agreement=float((predictions == dense.argmax(-1)).double().mean()),
        top1=float((predictions == cal.labels).double().mean()) if use_labels else None,
    )


def solve_level(
    error: Callable[[float], float], start: float, slope: float, tolerance: float, max_evals: int
) -> tuple[float, float] | None:
    """A level ``x`` with ``|error(x)| <= tolerance`` and the local slope there, or None when the
    target is out of reach or the evaluations run out.

    ``error`` rises with ``x`` (approximately: merging changes what later blocks see). Secant steps,
    starting from the prior ``slope``, find the root in two or three evaluations on the smooth
    reduction curve; once the root is bracketed, interpolation is kept away from the bracket's ends
    so that a curved stretch cannot stall it.
    """
    low, high = LOG_GAP_BOUNDS
    seen: list[tuple[float, float]] = []
    x = start
    while len(seen) < max_evals:
        f = error(x)
        seen.append((x, f))
        if len(seen) >= 2:
            (x0, f0), (x1, f1) = seen[-2:]
            if x1 != x0 and (f1 - f0) / (x1 - x0) > 0:
                slope = (f1 - f0) / (x1 - x0)
        if abs(f) <= tolerance:
            return x, slope
        below = [p for p in seen if p[1] < 0]
        above = [p for p in seen if p[1] > 0]
        if below and above:
            (xa, fa), (xb, fb) = max(below), min(above)
            t = min(0.9, max(0.1, -fa / (fb - fa)))
            x = xa + t * (xb - xa)
        elif x in (low, high):
            return None
        else:
            x = min(high, max(low, x - max(-2.0, min(2.0, f / slope))))
    return None


def search(
    score: Callable[[ATM], Point],
    shapes: Iterable[Shape],
    base: ATM,
    target: float,
    tolerance: float,
    max_evals: int,
    use_labels: bool,
) -> Calibration:
    """Solve the level of each shape for ``target`` and keep the best point within ``tolerance``.

    Best means lowest KL; with labels, highest top-1 and then lowest KL. Each shape starts from the
    previous shape's level and slope: the shapes lie on one curve, so their levels are close.
    """
    result = Calibration(target, tolerance)
    start, slope = FIRST_LOG_GAP, FIRST_SLOPE
    for shape in shapes:

        def error(log_gap: float, shape: Shape = shape) -> float:
            point = score(shape.merger(log_gap, base))
            result.points.append(point)
            return point.reduction - target

        solved = solve_level(error, start, slope, tolerance, max_evals)
        if solved is not None:
            start, slope = solved
    hits = [p for p in result.points if abs(p.reduction - target) <= tolerance]
    if hits:
        key = (lambda p: (-p.top1, p.kl)) if use_labels else (lambda p: p.kl)
        result.best = min(hits, key=key)
    return result


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


def header(result: Calibration, cal: CalibrationSet, images: Path, seed: int, seconds: float) -> str:
    """The YAML comment block recording where the operating point came from and what it did."""
    best = result.best
    assert best is not None
    when = time.strftime("%Y-%m-%d %H:%M")
    dense = f"dense: {cal.dense_gflops:.4g} GFLOPs"
    if result.dense_top1 is not None:
        dense += f", top-1 {100 * result.dense_top1:.1f}%"
    target = f"{100 * result.target:.1f}% +- {100 * result.tolerance:.1f} pp"
    lines = [
        f"Calibrated by `atm calibrate` on {when}: {cal.num_images} images of {images} (seed {seed})",
        f"target FLOPs reduction {target}; {len(result.points)} schedules evaluated in {seconds:.0f} s",
        f"chosen, on those images: {best.describe()}",
        dense,
        "Evaluate on held-out images: atm validate --config THIS_FILE --data.root DATASET",
    ]
    return "".join(f"# {line}\n" for line in lines)


class CalibrationTrainer(Trainer):
    """Lightning's Trainer plus ``calibrate``, which LightningCLI exposes as ``atm calibrate``.

    The ``atm`` CLI sets ``calibration_base_config`` to the parsed command-line config, which the
    calibrated file is written from; used from Python without it, the file holds the model and data
    settings only.
    """

    calibration_base_config: dict[str, Any] | None = None

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
                default: 0 (block 1 merges only exact duplicates) and 0.5.
            max_evals: evaluations allowed per schedule shape.
        """
        check_calibrate_args(target_reduction, tolerance, num_images, max_evals)
        if Path(output).exists() and not overwrite:
            raise FileExistsError(
                f"{output} already exists; pass --overwrite true to replace it, or choose another --output"
            )
        if self.world_size > 1:
            raise ValueError("calibrate runs on one device; set --trainer.devices 1")
        started = time.perf_counter()
        progress = self.progress_bar_callback is not None
        device = self.strategy.root_device
        model = model.eval().to(device)
        base = model.merger if isinstance(model.merger, ATM) else ATM()
        shapes = candidate_shapes(len(model.model.blocks), split_layers, decay_layers, alpha_drops)
        samples = calibration_samples(datamodule, num_images, seed)
        cal = load_calibration_set(model, datamodule, samples, device, progress)
        score = progress_scorer(model, cal, use_labels, len(shapes) * max_evals, progress)
        result = search(score, shapes, base, target_reduction, tolerance, max_evals, use_labels)
        patch(model.model, model.merger)
        if use_labels:
            result.dense_top1 = float((cal.dense_log_probs.argmax(-1) == cal.labels).double().mean())
        if result.best is None:
            raise RuntimeError(unreached_message(result))
        seconds = time.perf_counter() - started
        write_calibrated_config(
            Path(output),
            header(result, cal, datamodule.root / datamodule.train_split, seed, seconds),
            self.calibration_base_config or _minimal_config(model, datamodule),
            result.best.merger,
        )
        print(f"chosen: {result.best.describe()}\nwrote {output} ({seconds:.0f} s)")
        return result


def progress_scorer(
    module: TokenMergingModule, cal: CalibrationSet, use_labels: bool, most: int, progress: bool
) -> Callable[[ATM], Point]:
    """:func:`evaluate` that advances a bar (of at most ``most`` points) and prints each point."""
    bar = tqdm(total=most, desc="calibrate", disable=not progress, leave=False)

    def score(merger: ATM) -> Point:
        point = evaluate(module, cal, merger, use_labels)
        bar.update()
        tqdm.write(point.describe())
        return point

    return score


def check_calibrate_args(target: float, tolerance: float, num_images: int, max_evals: int) -> None:
    """Fail before decoding any image when the request cannot work out."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"--target_reduction is a fraction of the dense FLOPs in (0, 1), e.g. 0.3; got {target}")
    if not 0.0 < tolerance < target:
        raise ValueError(f"--tolerance must be in (0, target_reduction), e.g. 0.01 (1 pp); got {tolerance}")
    if num_images < 1 or max_evals < 2:
        raise ValueError(f"--num_images must be >= 1 and --max_evals >= 2; got {num_images} and {max_evals}")


def candidate_shapes(
    depth: int,
    split_layers: list[int] | None = None,
    decay_layers: list[int] | None = None,
    alpha_drops: list[float] | None = None,
) -> list[Shape]:
    """The grid of schedule shapes; each axis defaults to values that mattered on ViT-Ti and DeiT.

    Split layers near the end (depth-2, depth-1), the threshold reaching its floor at depth-2, and
    block 1 strict or merging near-duplicates (alpha_drop 0, 0.5): four shapes. On ViT-Ti the
    decay layer and alpha barely move the KL-vs-reduction curve; on images with blank background
    merging duplicates in block 1 is what keeps high reductions lossless.
    """
    splits = split_layers or sorted({max(1, depth - 2), max(1, depth - 1)})
    decays = decay_layers or [max(2, depth - 2)]
    drops = alpha_drops or [0.0, 0.5]
    bad = [d for d in decays if not 2 <= d <= depth] + [s for s in splits if not 1 <= s <= depth + 1]
    if bad or not all(0.0 <= a < 1.0 for a in drops):
        raise ValueError(
            f"--split_layers must lie in 1..{depth + 1}, --decay_layers in 2..{depth} for this "
            f"{depth}-block model, and --alpha_drops in [0, 1); got {split_layers}, {decay_layers}, {alpha_drops}"
        )
    return [Shape(s, d, a) for a in drops for s in splits for d in decays]


def unreached_message(result: Calibration) -> str:
    """Why no point qualified, with the reductions seen, and the fix that can work.

    When the strongest schedule (theta_min -1: every source merges once the threshold has decayed)
    still saves too little, or the weakest (theta_min 0.99999) already too much, no number of
    evaluations or tolerance helps: only another target does.
    """
    seen = sorted(p.reduction for p in result.points)
    span = f"{100 * seen[0]:.1f}%..{100 * seen[-1]:.1f}%" if seen else "none"
    unreached = (
        f"no schedule came within {100 * result.tolerance:.1f} pp of the target {100 * result.target:.1f}% "
        f"(reductions seen: {span})"
    )
    strongest = [p.reduction for p in result.points if _level_of(p) >= LOG_GAP_BOUNDS[1] - 1e-9]
    weakest = [p.reduction for p in result.points if _level_of(p) <= LOG_GAP_BOUNDS[0] + 1e-9]
    if strongest and max(seen) < result.target - result.tolerance:
        return (
            f"{unreached}; even the strongest schedule (theta_min -1) saves only {100 * max(seen):.1f}% "
            f"on these images with these --split_layers/--decay_layers/--alpha_drops, so choose "
            f"--target_reduction {math.floor(1000 * max(seen)) / 1000:g} or less"
        )
    if weakest and min(seen) > result.target + result.tolerance:
        return (
            f"{unreached}; even the weakest schedule (theta_min 0.99999) saves {100 * min(seen):.1f}%, "
            f"so choose --target_reduction {math.ceil(1000 * min(seen)) / 1000:g} or more"
        )
    return f"{unreached}; raise --max_evals or --tolerance, or choose another --target_reduction"


def _level_of(point: Point) -> float:
    """The point's level, log(1 - theta_min), as :meth:`Shape.merger` set it."""
    return math.log(max(1e-12, 1.0 - point.merger.theta_min))


def write_calibrated_config(path: Path, comment: str, base: dict[str, Any], merger: ATM) -> None:
    """Write the config with its provenance as a comment header."""
    config = calibrated_config(base, merger)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comment + yaml.safe_dump(config, sort_keys=False))


def _minimal_config(module: TokenMergingModule, datamodule: ImageNetDataModule) -> dict[str, Any]:
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
