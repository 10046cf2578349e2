"""create_model: every supported weights format loads exactly, and every failure names its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from atm_lightning import ATM
from atm_lightning.models import create_model
from atm_lightning.module import TokenMergingModule

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=1000)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("fmt", ["pth", "model", "state_dict", "safetensors"])
def test_timm_weight_files_load_exactly(tmp_path: Path, reference: torch.nn.Module, fmt: str) -> None:
    state = reference.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state if fmt == "pth" else {fmt: state}, path)
    assert_same_weights(create_model(NAME, weights=str(path)), reference)


def test_other_num_classes_gets_a_fresh_head(tmp_path: Path, reference: torch.nn.Module) -> None:
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(NAME, weights=str(path), num_classes=10)
    assert model.head.out_features == 10
    assert torch.equal(model.blocks[3].mlp.fc1.weight, reference.blocks[3].mlp.fc1.weight)


def test_head_of_a_non_imagenet_file_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = timm.create_model(NAME, num_classes=10)
    path = tmp_path / "w10.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert_same_weights(create_model(NAME, weights=str(path), num_classes=10), source)


def test_lightning_checkpoint_of_the_module_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = TokenMergingModule(NAME, num_classes=7, merger=ATM(alpha=0.95))
    assert all(key.startswith("model.") for key in module.state_dict())
    path = tmp_path / "last.ckpt"
    checkpoint = {
        "pytorch-lightning_version": "2.6.6",
        "hyper_parameters": dict(module.hparams),  # holds the ATM object, as outside the CLI
        "state_dict": module.state_dict(),
    }
    torch.save(checkpoint, path)
    loaded = create_model(NAME, weights=str(path), num_classes=7)
    assert_same_weights(loaded, module.model)
    with pytest.raises(ValueError, match=r"set --model.num_classes 7"):
        create_model(NAME, weights=str(path), num_classes=1000)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown timm model 'deit_tinyy_patch16_224'.*deit_tiny_patch16_224"
    ):
        create_model("deit_tinyy_patch16_224")


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*--model.weights"):
        create_model(NAME, weights=str(missing))


def test_weights_of_another_architecture_say_what_they_are(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(timm.create_model("deit_small_patch16_224", depth=2).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"looks like a ViT-small/16 \(width 384, 2 blocks.*is a ViT-tiny/16 \(width 192"
    ):
        create_model(NAME, weights=str(path))


def test_pretrained_offline_points_to_local_weights() -> None:
    with pytest.raises(RuntimeError, match=r"--model.weights"):
        create_model(NAME, pretrained=True)
