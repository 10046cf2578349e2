"""Shared fixtures. HF_HUB_OFFLINE is set before anything imports timm or huggingface_hub;
ATM_DEBUG makes the ``atm`` entry point raise a user's mistake as the exception it is, for tests
to match (tests of the one-line report unset it)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_FUSED_ATTN", "1")
os.environ["ATM_DEBUG"] = "1"

from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from tests.fakedata import make_image_folder
from tests.helpers import SMALL_DEPTH, draw_shapes, save_weights

# Real ViT-Ti weights and 1000 ImageNet images, for developers who have them next to the checkout.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "data" / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
SHARED_IMAGES = SHARED / "data" / "imagenet-sample" / "val"
CLASSES = ["cat", "dog", "fox"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_available() -> bool:
    return SHARED_WEIGHTS.is_file() and SHARED_IMAGES.is_dir()


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not shared_available():
        pytest.skip("the real ViT-Ti weights and ImageNet sample are absent")
    return SHARED_WEIGHTS


@pytest.fixture(scope="session")
def shared_images() -> Path:
    if not shared_available():
        pytest.skip("the real ViT-Ti weights and ImageNet sample are absent")
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluation set: val/ holds 8 images of 3 classes (3, 3, 2: unbalanced, and not a multiple
    of the usual batch sizes), train/ 9 other images."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "val", CLASSES, per_class=3)
    (root / "val" / "fox" / "fox_2.JPEG").unlink()
    make_image_folder(root / "train", CLASSES, per_class=3, seed=1)
    return root


@pytest.fixture(scope="session")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training set: 6 train/ images (3 batches of 2 per epoch) and 3 val/ images, 3 classes."""
    root = tmp_path_factory.mktemp("train")
    make_image_folder(root / "train", CLASSES, per_class=2, seed=1)
    make_image_folder(root / "val", CLASSES, per_class=1)
    return root


@pytest.fixture(scope="session")
def vit_weights(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``vit_weights(num_classes, **timm_kwargs)``: a random ViT-Ti (seed 0) saved as safetensors,
    made once per setting."""
    folder = tmp_path_factory.mktemp("weights")
    made: dict[str, Path] = {}

    def weights(num_classes: int = 3, **kwargs) -> Path:
        key = f"vit_t_{num_classes}cls_" + "_".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
        if key not in made:
            torch.manual_seed(0)
            model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **kwargs)
            made[key] = save_weights(model, folder / f"{key}.safetensors")
        return made[key]

    return weights


@pytest.fixture
def shapes_folder(tmp_path: Path) -> Path:
    """Four images from flat to busy: 0, 1, 3 and 40 rectangles."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, num_rects in enumerate((0, 1, 3, 40)):
        draw_shapes(folder / f"img{i}_{num_rects}rects.png", num_rects, seed=i)
    return folder


@pytest.fixture
def small_vit(monkeypatch: pytest.MonkeyPatch) -> Callable[[], torch.nn.Module]:
    """Make ``atm benchmark`` and the tools build a 4-block, 64-wide ViT (same 224 px input), about
    20x cheaper than ViT-Ti; returns the factory so a test can rebuild the very same weights."""
    from atm_lightning.evaluation import options

    def create(model_name: str, pretrained: bool = False, weights: str | None = None, num_classes: int = 1000):
        torch.manual_seed(0)
        return timm.create_model(model_name, depth=SMALL_DEPTH, embed_dim=64, num_heads=2, num_classes=num_classes)

    monkeypatch.setattr(options, "create_model", create)
    return lambda: create("vit_tiny_patch16_224").eval()


@pytest.fixture
def restore_threads():
    """For tests of commands whose main() calls torch.set_num_threads: later tests keep the suite's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
