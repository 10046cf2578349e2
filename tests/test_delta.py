"""Delta files: only what changed, applied exactly on top of the base weights, and never to others."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

from atm_lightning import ToMe
from atm_lightning.delta import Delta, apply_delta, read_delta, weights_sha256
from atm_lightning.distill import Distillation, export_delta
from atm_lightning.models import create_model
from atm_lightning.module import TokenMergingModule
from tests.helpers import blocky_images, save_weights

NAME = "vit_tiny_patch16_224"
SMALL = {"img_size": 64, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_weights(timm.create_model(NAME, num_classes=5, **SMALL), tmp_path_factory.mktemp("base") / "base.safetensors")


def trained(base: Path, trainable: str, tmp_path: Path) -> tuple[TokenMergingModule, Path]:
    """A distillation module whose trainable tensors moved, as after training, and its delta file."""
    torch.manual_seed(0)
    settings = Distillation(trainable=trainable, lora_rank=2, delta=str(tmp_path / f"{trainable}.safetensors"))
    tm = TokenMergingModule(NAME, weights=str(base), num_classes=5, model_kwargs=SMALL, merger=ToMe(r=8), distill=settings)
    with torch.no_grad():
        for param in tm.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return tm.eval(), export_delta(tm, finished(tmp_path, steps=7))


def finished(folder: Path, steps: int) -> SimpleNamespace:
    """What export_delta reads of a Trainer at the end of a one-device run without EMA."""
    return SimpleNamespace(log_dir=str(folder), is_global_zero=True, callbacks=[], global_step=steps)


@pytest.mark.parametrize("trainable", ["norms_biases", "lora", "lora+norms_biases", "all"])
def test_a_delta_reproduces_the_trained_model_exactly(trainable: str, base: Path, tmp_path: Path) -> None:
    tm, path = trained(base, trainable, tmp_path)
    delta = read_delta(path)
    assert delta.base_sha256 == weights_sha256(create_model(NAME, weights=str(base), num_classes=5, model_kwargs=SMALL).state_dict())
    assert delta.info["steps"] == 7 and delta.info["trainable"] == trainable
    if "lora" in trainable:  # factors, not weights: 2 * (64 + 192) values for a qkv instead of 64 * 192
        assert set(delta.low_rank) == {f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("attn.qkv", "mlp.fc1", "mlp.fc2")}
        assert delta.low_rank["blocks.0.attn.qkv.weight"][0].shape == (2, 64)
    loaded = TokenMergingModule(NAME, weights=str(base), num_classes=5, model_kwargs=SMALL, merger=ToMe(r=8), delta=str(path)).eval()
    images = blocky_images(4, size=64)
    with torch.no_grad():
        assert torch.equal(loaded(images), tm(images))
        # Its fidelity reference is the base model, unmerged, as the distilled module's is.
        assert torch.equal(loaded._dense_logits(images, None), tm._dense_logits(images, None))


def test_only_changed_tensors_are_stored(base: Path, tmp_path: Path) -> None:
    tm, path = trained(base, "norms_biases", tmp_path)
    with torch.no_grad():
        tm.model.blocks[1].norm2.weight.copy_(tm.base_weights.tensors()["blocks.1.norm2.weight"])  # back to base
    delta = read_delta(export_delta(tm, finished(tmp_path, steps=1)))
    assert "blocks.1.norm2.weight" not in delta.names and "blocks.1.norm2.bias" in delta.names
    assert path.stat().st_size < 30_000


def test_a_delta_refuses_other_base_weights(base: Path, tmp_path: Path) -> None:
    _, path = trained(base, "lora", tmp_path)
    torch.manual_seed(1)
    other = save_weights(timm.create_model(NAME, num_classes=5, **SMALL), tmp_path / "other.safetensors")
    want = read_delta(path).base_sha256
    found = weights_sha256(create_model(NAME, weights=str(other), num_classes=5, model_kwargs=SMALL).state_dict())
    with pytest.raises(ValueError) as error:
        TokenMergingModule(NAME, weights=str(other), num_classes=5, model_kwargs=SMALL, merger=ToMe(r=8), delta=str(path))
    message = str(error.value)
    assert want in message and found in message and str(other) in message
    assert "base.safetensors" in message and "--model.weights" in message
    with pytest.raises(ValueError, match="not a delta file.*--model.delta"):
        apply_delta(create_model(NAME, weights=str(base), num_classes=5, model_kwargs=SMALL), base, "base")


def test_the_hash_is_of_the_tensors_not_of_the_file(base: Path, tmp_path: Path) -> None:
    model = create_model(NAME, weights=str(base), num_classes=5, model_kwargs=SMALL)
    torch.save(model.state_dict(), tmp_path / "same.pth")
    again = create_model(NAME, weights=str(tmp_path / "same.pth"), num_classes=5, model_kwargs=SMALL)
    assert weights_sha256(again.state_dict()) == weights_sha256(model.state_dict())
    with torch.no_grad():
        again.head.bias[0] += 1e-7
    assert weights_sha256(again.state_dict()) != weights_sha256(model.state_dict())


def test_a_delta_for_another_architecture_names_the_tensor(base: Path, tmp_path: Path) -> None:
    model = create_model(NAME, weights=str(base), num_classes=5, model_kwargs=SMALL)
    Delta(weights_sha256(model.state_dict()), dense={"blocks.7.norm1.weight": torch.ones(64)}).save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="blocks.7.norm1.weight, which the model does not have"):
        apply_delta(model, tmp_path / "d.safetensors", "base")
