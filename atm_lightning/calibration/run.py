"""Calibrating a model: training images in, the best ATM schedule for a FLOPs target out.

ATM's thresholds are per model (docs/method.md, "Operating points"), and the images a number is
reported on must not choose them. So calibration reads the *training* split through the *eval*
transform, runs the dense model once, and caches its log-probabilities and the preprocessed
images. Each candidate schedule then costs one merged forward pass over the cache, scored by how
little it changes the dense model: KL(dense || merged) averaged over images (label-free), with
top-1 agreement beside it. :mod:`.search` chooses which schedules to try.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..data import ImageNetDataModule
from ..data.datasets import Sample
from ..merge import ATM, NoMerge
from ..module import TokenMergingModule
from ..patch import merge_stats, patch
from ..patch.rerun import top2_gap
from ..patch.vit import reads_prefix_only
from .search import Calibration, Point, Shape, search


# Images run again unmerged by default (``--rerun_fraction``): 0.1 up to 30% fewer FLOPs, falling
# linearly to 0.05 at 40% and staying there. On the calibration half of ViT-Ti's held-out protocol
# (docs/calibration.md) these changed the fewest predictions: past 30% the extra merging that pays
# for the second passes costs more than a larger rerun share recovers.
RERUN_FRACTION = 0.1
RERUN_FRACTION_HIGH = 0.05  # from a 40% target on
# Dense top-1 on the calibration images from which they look like the model's own training
# images: a model is surer of those, so fewer of them fall below a rerun margin than of new ones.
SEEN_IMAGES_TOP1 = 0.97


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed training images with the dense model's outputs, cached for the whole search."""

    batches: list[Tensor]
    labels: Tensor
    dense_log_probs: Tensor  # [N, C]
    dense_gflops: float

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def dense_top1(self) -> float:
        return float((self.dense_log_probs.argmax(-1) == self.labels).double().mean())


def calibrate(
    module: TokenMergingModule,
    datamodule: ImageNetDataModule,
    samples: list[Sample],
    shapes: list[Shape],
    *,
    target: float,
    tolerance: float = 0.01,
    max_evals: int = 8,
    use_labels: bool = False,
    rerun_fraction: float = 0.0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Calibration:
    """Search ATM schedules of ``shapes`` for ``module``'s model on the images ``samples``.

    ``samples`` are training images (:func:`draw_samples`), read through the DataModule's eval
    transform. The module's merger keeps its batch rule and proportional attention; the model is
    patched with each candidate and given its own merger back afterwards, also when the search
    fails. ``result.best`` is None when no schedule came within ``tolerance`` of ``target``.
    With ``rerun_fraction`` each schedule's ``rerun_margin`` is set so that this fraction of the
    images runs again unmerged, and the target counts that second pass.
    """
    module = module.eval().to(device)
    base = replace(starting_merger(module), rerun_margin=0.0)  # the fraction sets it
    try:
        cal = load_calibration_set(module.model, datamodule, samples, device, progress)
        warning = seen_images_warning(cal.dense_top1(), rerun_fraction)
        if warning:
            print(warning, file=sys.stderr)
        score = ProgressScorer(module.model, cal, use_labels, rerun_fraction, progress)
        try:
            result = search(score, shapes, base, target, tolerance, max_evals, use_labels)
        finally:
            score.bar.close()
    finally:
        module.restore_merging()
    dense_top1 = cal.dense_top1() if use_labels else None
    return replace(result, num_images=cal.num_images, dense_gflops=cal.dense_gflops, dense_top1=dense_top1)


def seen_images_warning(dense_top1: float, rerun_fraction: float) -> str | None:
    """A warning when a rerun margin is set on images the dense model almost never gets wrong.

    The margin is a quantile of the merged model's certainty on the calibration images. On
    images the model was trained on it is surer than on new ones, so on new images more than
    ``rerun_fraction`` of them run again and the saving falls short of the target. Near-perfect
    dense top-1 is the one sign of such images that calibration can see.
    """
    if rerun_fraction <= 0 or dense_top1 < SEEN_IMAGES_TOP1:
        return None
    return (
        f"warning: the dense model gets {100 * dense_top1:.1f}% of the calibration images right. If it "
        f"was trained on them, it is surer of them than of new images, and more than the "
        f"{100 * rerun_fraction:g}% of new images set by --rerun_fraction will run again: a smaller "
        f"saving than the target. Calibrate on images it was not trained on, or pass --rerun_fraction 0"
    )


def starting_merger(module: TokenMergingModule) -> ATM:
    """The ATM whose thresholds the search sets: the module's own when its merger is ATM (all its
    options kept), otherwise ATM with the options that transferred best to held-out images
    (docs/calibration.md): per-head keys, the size-weighted merge error, class-attention
    weighting (models with a class token) and norm-keeping merges; and, where the head reads the
    class token alone, a last block that computes only the prefix tokens (same logits)."""
    if isinstance(module.merger, ATM):
        return module.merger
    class_token = getattr(module.model, "cls_token", None) is not None
    return ATM(
        keys="per_head", size_weighted=True, attention_power=0.5 if class_token else 0.0, keep_norm=True,
        last_block_prefix_only=reads_prefix_only(module.model),
    )  # fmt: skip


def default_rerun_fraction(module: TokenMergingModule, target: float) -> float:
    """What ``--rerun_fraction`` means when not given: from the refined starting point (or a config
    whose merger already reruns) :data:`RERUN_FRACTION` up to a 30% target, falling linearly to
    :data:`RERUN_FRACTION_HIGH` at 40% and above; 0 for a config's own ATM without ``rerun_margin``."""
    merger = module.merger
    if isinstance(merger, ATM) and merger.rerun_margin == 0:
        return 0.0
    step = min(1.0, max(0.0, (target - 0.3) / 0.1))
    return round(RERUN_FRACTION + step * (RERUN_FRACTION_HIGH - RERUN_FRACTION), 4)


def check_calibrate_args(
    target: float, tolerance: float, num_images: int, max_evals: int, rerun_fraction: float = 0.0
) -> None:
    """Fail before decoding any image when the request cannot work out."""
    if not 0.0 <= rerun_fraction < 0.5:
        raise ValueError(f"--rerun_fraction is the fraction of images run again unmerged, in [0, 0.5), e.g. 0.1; got {rerun_fraction}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"--target_reduction is a fraction of the dense FLOPs in (0, 1), e.g. 0.3; got {target}")
    if not 0.0 < tolerance < target:
        raise ValueError(f"--tolerance must be in (0, target_reduction), e.g. 0.01 (1 pp); got {tolerance}")
    if num_images < 1 or max_evals < 2:
        raise ValueError(f"--num_images must be >= 1 and --max_evals >= 2; got {num_images} and {max_evals}")


def draw_samples(datamodule: ImageNetDataModule, num_images: int, seed: int, labels_needed: bool = True) -> list[Sample]:
    """``num_images`` labelled training images, drawn with ``seed`` (all of them if there are fewer).
    ``labels_needed=False``: images whose class index cannot be known are drawn too (label -1)."""
    try:
        samples = datamodule.labelled_images(datamodule.train_split, labels_needed)
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
    model: nn.Module, datamodule: ImageNetDataModule, samples: list[Sample], device: torch.device | str, progress: bool
) -> CalibrationSet:
    """Decode the images once (eval transform: no augmentation) and run the dense model on them."""
    model = patch(model, NoMerge())
    batches, labels, log_probs = [], [], []
    with torch.inference_mode():
        for images, targets in tqdm(datamodule.eval_loader(samples), desc="dense pass", disable=not progress, leave=False):
            images = images.to(device)
            batches.append(images)
            labels.append(targets)
            log_probs.append(F.log_softmax(model(images).double(), dim=-1).cpu())
    return CalibrationSet(batches, torch.cat(labels), torch.cat(log_probs), merge_stats(model).gflops_dense)


def evaluate(model: nn.Module, cal: CalibrationSet, merger: ATM, use_labels: bool, rerun_fraction: float = 0.0) -> Point:
    """Reduction, KL and agreement of ``merger`` against the cached dense outputs.

    With ``rerun_fraction`` the merger's ``rerun_margin`` becomes the margin below which that
    fraction of these images falls; those images take the cached dense outputs and the FLOPs of
    the unmerged rerun, which is what the patched model does with that margin.
    """
    model = patch(model, replace(merger, rerun_margin=0.0))
    gflops, rerun_gflops, log_probs = [], [], []
    with torch.inference_mode():
        for images in cal.batches:
            log_probs.append(F.log_softmax(model(images).double(), dim=-1).cpu())
            stats = merge_stats(model)
            gflops.append(stats.gflops.cpu())
            rerun_gflops.append(torch.full_like(gflops[-1], stats.gflops_rerun))  # where the batch first merged
    merged, gflops = torch.cat(log_probs), torch.cat(gflops)
    dense = cal.dense_log_probs
    rerun = torch.zeros(len(merged), dtype=torch.bool)
    if rerun_fraction > 0 and merger.merges:
        gap = top2_gap(merged)
        margin = float(f"{float(torch.quantile(gap, rerun_fraction)):.4g}")
        merger, rerun = replace(merger, rerun_margin=margin), gap < margin
        merged = torch.where(rerun[:, None], dense, merged)
        gflops = gflops + rerun.double() * torch.cat(rerun_gflops)
    kl = (dense.exp() * (dense - merged)).sum(-1).mean()
    predictions = merged.argmax(-1)
    return Point(
        merger=merger,
        reduction=1.0 - float(gflops.mean()) / cal.dense_gflops,
        kl=float(kl),
        agreement=float((predictions == dense.argmax(-1)).double().mean()),
        top1=float((predictions == cal.labels).double().mean()) if use_labels else None,
        rerun=float(rerun.double().mean()),
    )


class ProgressScorer:
    """:func:`evaluate` that prints each point and counts them on a bar. The bar has no total:
    the search stops a shape as soon as it reaches the target, so how many points it takes is
    not known in advance (a bound of shapes x max_evals ended at a quarter)."""

    def __init__(self, model: nn.Module, cal: CalibrationSet, use_labels: bool, rerun_fraction: float, progress: bool):
        self.model, self.cal, self.use_labels, self.rerun_fraction = model, cal, use_labels, rerun_fraction
        self.bar = tqdm(desc="calibrate", unit=" schedules", disable=not progress, leave=False)

    def __call__(self, merger: ATM) -> Point:
        point = evaluate(self.model, self.cal, merger, self.use_labels, self.rerun_fraction)
        self.bar.update()
        tqdm.write(point.describe())
        return point
