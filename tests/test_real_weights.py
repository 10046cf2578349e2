"""The shipped ATM ladder on real ImageNet weights and images.

Needs the real ViT-Ti weights and the 1000-image ImageNet sample next to the checkout (see
tests/conftest.py); skipped without them. The default suite runs a quick check on 64 of the
images. The slow checks hold the ladder (``configs/vit_t_atm_{20,30,40}.yaml``, calibrated on one
half of the sample, the seeded split of ``tools/holdout_split.py``) to its measured fidelity on
the other half, the images nobody chose a setting on, against the dense model and ToMe.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from torch import Tensor

from atm_lightning import ATM, merge_stats, patch
from atm_lightning.cli import main
from atm_lightning.data import ImageNetDataModule
from atm_lightning.delta import apply_delta
from atm_lightning.data.images import evenly_spaced, image_paths, load_images
from atm_lightning.fidelity import compare_batch, summary
from atm_lightning.flops import ViTCost
from atm_lightning.merge import from_config_file
from atm_lightning.models import create_model
from tests.helpers import CONFIGS, load_tool

NAME = "vit_tiny_patch16_224"
CONFIG = CONFIGS / "vit_t_atm.yaml"
BATCH = 100
# Agreement with dense (%) each rung must keep on the held-out half; docs/calibration.md has the measurements.
AGREE_20, AGREE_30, AGREE_40 = 99.2, 98.0, 95.0  # measured: 99.8, 99.0, 96.6
DISTILLED_50 = CONFIGS / "vit_t_atm_50_distilled.yaml"

pytestmark = pytest.mark.shared


def shipped_atm() -> ATM:
    merger = from_config_file(CONFIG)
    assert isinstance(merger, ATM)
    return merger


@torch.no_grad()
def test_shipped_atm_on_64_images_keeps_the_dense_predictions_and_saves_flops(shared_weights, shared_images):
    """Quick: 64 images spread over the classes (half of them chose the point), one batch."""
    images, _ = load_images(evenly_spaced(image_paths([shared_images]), 64), NAME)
    model = create_model(NAME, weights=str(shared_weights)).eval()
    dense = model(images).argmax(-1)
    merged = patch(model, shipped_atm())(images).argmax(-1)
    assert float((merged == dense).double().mean()) >= 0.875
    stats = merge_stats(model)
    reduction, rerun = stats.flops_reduction, stats.rerun
    assert float(reduction.mean()) >= 0.25 and bool((reduction[~rerun] > 0).all())
    assert bool((reduction[rerun] < 0).all())  # merged, then dense again: more than dense


@pytest.fixture(scope="module")
def held_out(shared_weights, shared_images):
    """The model, the held-out half of the sample (eval transform) and its labels."""
    calibration, held = load_tool("holdout_split").split(image_paths([shared_images]), 0.5, seed=0)
    assert len(held) == 500 and not set(calibration) & set(held)
    datamodule = ImageNetDataModule(root=str(shared_images.parent), model_name=NAME, num_workers=0)
    labels = dict(datamodule.labelled_images("val"))
    images, _ = load_images(held, NAME)
    model = create_model(NAME, weights=str(shared_weights)).eval()
    return model, images, torch.tensor([labels[p] for p in held])


@torch.no_grad()
def evaluate(model, images, method, **settings) -> tuple[Tensor, float]:
    """Logits and mean GFLOPs per image."""
    patch(model, method, **settings)
    logits, gflops = [], 0.0
    for start in range(0, len(images), BATCH):
        logits.append(model(images[start : start + BATCH]))
        gflops += float(merge_stats(model).gflops.sum())
    return torch.cat(logits), gflops / len(images)


def tome_r_with_at_least(model, gflops: float) -> int:
    """The largest constant ToMe r whose (input-independent) GFLOPs are still >= ``gflops``."""
    cost = ViTCost.from_model(model)
    best = 0
    for r in range(1, 50):
        tokens, n = [197], 197
        for _ in range(cost.depth):
            n -= min(r, (n - 1) // 2)
            tokens.append(n)
        if cost.image_macs(torch.tensor([tokens]))[0] / 1e9 >= gflops:
            best = r
    return best


def fidelity(logits: Tensor, dense: Tensor, labels: Tensor) -> dict[str, float]:
    sums = {key: float(value) for key, value in compare_batch(logits, dense, labels).items()}
    return summary(sums, len(labels))


@pytest.fixture(scope="module")
def dense(held_out) -> tuple[Tensor, float]:
    model, images, _ = held_out
    return evaluate(model, images, "none")


@pytest.mark.slow
def test_atm_validate_reports_the_engine_top1(shared_weights, shared_images, tmp_path, monkeypatch):
    """The user path (`atm validate` with the dense config) gives the engine's dense top-1 exactly."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(CONFIGS / "vit_t_dense.yaml"), "--model.weights", str(shared_weights)]
    args += ["--data.root", str(shared_images.parent), "--data.batch_size", str(BATCH), "--data.num_workers", "0"]
    args += ["--trainer.callbacks", "[]"]
    with mock.patch("sys.argv", ["atm"]):
        main(args)
    (metrics,) = tmp_path.glob("runs/**/metrics.json")
    row = json.loads(metrics.read_text())
    assert row["num_images"] == 1000 and row["top1"] == pytest.approx(81.9, abs=1e-4)  # timm's eval transform
    assert row["gflops"] == pytest.approx(1.25368, abs=1e-5) and row["agreement"] == 100.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "reduction", "min_agreement"),
    [("vit_t_atm_20.yaml", 0.20, AGREE_20), ("vit_t_atm_30.yaml", 0.30, AGREE_30), ("vit_t_atm_40.yaml", 0.40, AGREE_40)],
)
def test_ladder_holds_on_held_out_images_and_beats_tome(held_out, dense, config, reduction, min_agreement):
    model, images, labels = held_out
    dense_logits, dense_gflops = dense
    merger = from_config_file(CONFIGS / config)
    logits, gflops = evaluate(model, images, merger)
    atm = fidelity(logits, dense_logits, labels)
    assert abs(1 - gflops / dense_gflops - reduction) <= 0.02
    assert atm["agreement"] >= min_agreement
    r = tome_r_with_at_least(model, gflops)
    tome_logits, tome_gflops = evaluate(model, images, "tome", r=r)
    tome = fidelity(tome_logits, dense_logits, labels)
    assert tome_gflops >= gflops  # ToMe is given at least ATM's FLOPs ...
    assert atm["kl"] < tome["kl"] / 2 and atm["agreement"] > tome["agreement"]  # ... and changes more


def test_the_shipped_delta_is_for_these_weights(shared_weights) -> None:
    """The distilled point's delta applies to the ViT-Ti weights it was trained from (it refuses others)."""
    model = create_model(NAME, weights=str(shared_weights))
    changed = apply_delta(model, CONFIGS / "vit_t_atm_50_distilled.safetensors", "the shared weights")
    assert len(changed) == 100 and all(name.endswith((".weight", ".bias")) for name in changed)


@pytest.mark.slow
def test_the_distilled_point_beats_its_thresholds_without_the_delta(held_out, dense):
    """Held out: the delta lowers the KL by a tenth and changes no more predictions, at the same saving."""
    model, images, labels = held_out
    dense_logits, dense_gflops = dense
    merger = from_config_file(DISTILLED_50)
    plain_logits, _ = evaluate(model, images, merger)
    plain = fidelity(plain_logits, dense_logits, labels)
    base = apply_delta(model, CONFIGS / "vit_t_atm_50_distilled.safetensors", "the shared weights")
    try:
        logits, gflops = evaluate(model, images, merger)
    finally:
        model.load_state_dict(base, strict=False)
    distilled = fidelity(logits, dense_logits, labels)
    assert abs(1 - gflops / dense_gflops - 0.5) <= 0.02  # measured: 51.2%
    assert distilled["kl"] < 0.9 * plain["kl"] and distilled["agreement"] >= plain["agreement"]  # 0.138 < 0.159; 88.8 >= 88.2
