"""The shipped ATM operating point on real ImageNet weights and images.

Needs the real ViT-Ti weights and the 1000-image ImageNet sample next to the checkout (see
tests/conftest.py); skipped without them. The default suite runs a quick check on 64 of the
images; the 1000-image checks are slow: ATM must keep top-1 at least equal to the dense model
while cutting mean GFLOPs by 25% or more, and ToMe given at least as many GFLOPs must be less
accurate. The operating point is read from ``configs/vit_t_atm.yaml``, so the tests check what
users run.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from atm_lightning import ATM, merge_stats, patch
from atm_lightning.cli import main
from atm_lightning.data import ImageNetDataModule
from atm_lightning.data.images import evenly_spaced, image_paths, load_images
from atm_lightning.flops import ViTCost
from atm_lightning.merge import from_config_file
from atm_lightning.models import create_model
from tests.helpers import CONFIGS

NAME = "vit_tiny_patch16_224"
CONFIG = CONFIGS / "vit_t_atm.yaml"
BATCH = 100

pytestmark = pytest.mark.shared


def shipped_atm() -> ATM:
    merger = from_config_file(CONFIG)
    assert isinstance(merger, ATM)
    return merger


@torch.no_grad()
def test_shipped_atm_on_64_images_keeps_the_dense_predictions_and_saves_flops(shared_weights, shared_images):
    """Quick: 64 images spread over the classes, one batch. On them ATM changes 5 of the dense
    model's predictions and saves 29% of the FLOPs (all 1000: 96.1% agreement, 27.7%)."""
    images, _ = load_images(evenly_spaced(image_paths([shared_images]), 64), NAME)
    model = create_model(NAME, weights=str(shared_weights)).eval()
    dense = model(images).argmax(-1)
    merged = patch(model, shipped_atm())(images).argmax(-1)
    assert float((merged == dense).double().mean()) >= 0.875
    reduction = merge_stats(model).flops_reduction
    assert float(reduction.mean()) >= 0.25 and bool((reduction > 0).all())


@pytest.fixture(scope="module")
def sample(shared_weights, shared_images):
    datamodule = ImageNetDataModule(
        root=str(shared_images.parent), model_name="vit_tiny_patch16_224", batch_size=BATCH, num_workers=0
    )
    datamodule.setup("validate")
    images, labels = zip(*(datamodule.val_dataset[i] for i in range(len(datamodule.val_dataset))), strict=True)
    model = create_model("vit_tiny_patch16_224", weights=str(shared_weights)).eval()
    return model, torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def evaluate(model, images, labels, method, **settings) -> tuple[float, float]:
    """Top-1 and mean GFLOPs per image."""
    patch(model, method, **settings)
    correct, gflops = 0, 0.0
    for start in range(0, len(images), BATCH):
        logits = model(images[start : start + BATCH])
        correct += int((logits.argmax(-1) == labels[start : start + BATCH]).sum())
        gflops += float(merge_stats(model).gflops.sum())
    return correct / len(images), gflops / len(images)


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


@pytest.fixture(scope="module")
def dense(sample) -> tuple[float, float]:
    return evaluate(*sample, "none")


@pytest.mark.slow
def test_atm_validate_reports_the_engine_top1(sample, dense, shared_weights, shared_images, tmp_path, monkeypatch):
    """The user path (`atm validate` with the dense config) gives the engine's dense top-1 exactly."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(CONFIGS / "vit_t_dense.yaml"), "--model.weights", str(shared_weights)]
    args += ["--data.root", str(shared_images.parent), "--data.batch_size", str(BATCH), "--data.num_workers", "0"]
    args += ["--trainer.callbacks", "[]"]
    with mock.patch("sys.argv", ["atm"]):
        main(args)
    (metrics,) = tmp_path.glob("runs/**/metrics.json")
    row = json.loads(metrics.read_text())
    assert row["num_images"] == 1000
    assert row["top1"] == pytest.approx(100 * dense[0], abs=1e-4)  # float32 metric; one image = 0.1
    assert row["gflops"] == pytest.approx(dense[1], rel=1e-9)


@pytest.mark.slow
def test_shipped_atm_is_lossless_and_beats_tome(sample, dense):
    model, images, labels = sample
    assert len(images) == 1000
    top1_dense, gflops_dense = dense
    assert top1_dense == pytest.approx(0.819, abs=0.0015)  # 81.9% with timm's eval transform
    top1_atm, gflops_atm = evaluate(model, images, labels, shipped_atm())
    reduction = 1 - gflops_atm / gflops_dense
    assert top1_atm >= top1_dense
    assert reduction >= 0.25
    r = tome_r_with_at_least(model, gflops_atm)
    top1_tome, gflops_tome = evaluate(model, images, labels, "tome", r=r)
    assert gflops_tome >= gflops_atm
    assert top1_tome < top1_atm
