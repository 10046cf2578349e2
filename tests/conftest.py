"""Shared fixtures. HF_HUB_OFFLINE is set before anything imports timm or huggingface_hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_FUSED_ATTN", "1")

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "data" / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
SHARED_IMAGES = SHARED / "data" / "imagenet-sample" / "val"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_available() -> bool:
    return SHARED_WEIGHTS.is_file() and SHARED_IMAGES.is_dir()


requires_shared = pytest.mark.skipif(not shared_available(), reason="../shared/data is absent")


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not shared_available():
        pytest.skip("../shared/data is absent")
    return SHARED_WEIGHTS


@pytest.fixture(scope="session")
def shared_images() -> Path:
    if not shared_available():
        pytest.skip("../shared/data is absent")
    return SHARED_IMAGES


@pytest.fixture
def restore_threads():
    """For tests of tools whose main() calls torch.set_num_threads: later tests keep the suite's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
