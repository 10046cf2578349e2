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
from atm_lightning.weights import check_resume_checkpoint

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


@pytest.mark.parametrize(("file_classes", "num_classes"), [(1000, 6), (200, 1000)])
def test_head_size_mismatch_is_an_error_naming_both_fixes(tmp_path: Path, file_classes, num_classes) -> None:
    # Both loaded silently with a random head before (top-1 0.00%, exit 0, metrics.json written).
    path = tmp_path / "w.safetensors"
    state = timm.create_model(NAME, num_classes=file_classes).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    message = (
        rf"{file_classes}-class classifier but --model.num_classes is {num_classes}; "
        rf"pass --model.num_classes {file_classes} to use it, or --model.new_head true"
    )
    with pytest.raises(ValueError, match=message):
        create_model(NAME, weights=str(path), num_classes=num_classes)


def test_pretrained_head_size_mismatch_is_an_error_before_any_download() -> None:
    with pytest.raises(ValueError, match=r"pretrained weights of .* 1000-class classifier .* is 6; pass"):
        create_model(NAME, pretrained=True, num_classes=6)


def test_new_head_keeps_the_backbone_and_starts_a_fresh_classifier(
    tmp_path: Path, reference: torch.nn.Module
) -> None:
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(NAME, weights=str(path), num_classes=10, new_head=True)
    assert model.head.out_features == model.num_classes == 10
    assert_same_weights(model, reference, skip="head.")
    assert float(model.head.weight.detach().std()) == pytest.approx(0.02, rel=0.1)  # timm's ViT head init
    assert not model.head.bias.any()
    # Same size, still a new head: the option means "do not use the file's classifier".
    same = create_model(NAME, weights=str(path), num_classes=1000, new_head=True)
    assert not torch.equal(same.head.weight, reference.head.weight)
    # A backbone without any classifier needs the option too.
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}, headless)
    with pytest.raises(ValueError, match=r"have no classifier .*--model.new_head true"):
        create_model(NAME, weights=str(headless), num_classes=10)
    renewed = create_model(NAME, weights=str(headless), num_classes=10, new_head=True)
    assert_same_weights(renewed, model, skip="head.")


def test_tools_take_the_head_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w10.safetensors"
    state = timm.create_model(NAME, num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert create_model(NAME, weights=str(path), num_classes=None).head.out_features == 10


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("random.safetensors", "a safetensors file"),
        ("random.pth", "a PyTorch checkpoint"),
        ("empty.ckpt", "a PyTorch checkpoint"),
        ("truncated.ckpt", "a PyTorch checkpoint"),
    ],
)
def test_damaged_weights_files_name_the_path_and_the_flag(
    tmp_path: Path, reference: torch.nn.Module, name: str, kind: str
) -> None:
    path = tmp_path / name
    if name.startswith("random"):
        path.write_bytes(bytes(range(256)) * 8)
    elif name.startswith("empty"):
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": reference.state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read {path} as {kind}.*damaged.*--model.weights"):
        create_model(NAME, weights=str(path))


@pytest.mark.parametrize("name", ["renamed.pth", "renamed.bin"])
def test_safetensors_under_another_name_load_as_safetensors(tmp_path: Path, reference: torch.nn.Module, name: str) -> None:
    # Was a bare `KeyError: 53` from torch's unpickler.
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    assert_same_weights(create_model(NAME, weights=str(path)), reference)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "ckpt"])
def test_weights_holding_nan_are_refused(tmp_path: Path, reference: torch.nn.Module, fmt: str) -> None:
    # Were evaluated: loss nan, yet "lossless: true" and 100% agreement with the equally broken dense pass.
    state = {k: v.clone().contiguous() for k, v in reference.state_dict().items()}
    state["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    path = tmp_path / f"nan.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    else:
        checkpoint = {"pytorch-lightning_version": "2.6.6", "state_dict": {f"model.{k}": v for k, v in state.items()}}
        torch.save(checkpoint, path)
    message = rf"the weights in {path} hold NaN or inf in 1 tensor\(s\) \(first: blocks.3.mlp.fc1.weight\)"
    with pytest.raises(ValueError, match=message):
        create_model(NAME, weights=str(path))


def test_a_checkpoint_to_resume_from_is_checked_before_lightning_reads_it(tmp_path: Path, reference) -> None:
    checkpoint = {"pytorch-lightning_version": "2.6.6", "state_dict": {}, "epoch": 3}
    good = tmp_path / "last.ckpt"
    torch.save(checkpoint, good)
    check_resume_checkpoint(good)
    check_resume_checkpoint("last")  # Lightning's own names are Lightning's to resolve
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"cannot resume from --ckpt_path {truncated} \(RuntimeError: .*\); the file is damaged"):
        check_resume_checkpoint(truncated)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    with pytest.raises(ValueError, match=rf"--ckpt_path {weights} holds weights only; .* pass --model.weights {weights}"):
        check_resume_checkpoint(weights)
    plain = tmp_path / "plain.pth"
    torch.save(reference.state_dict(), plain)
    with pytest.raises(ValueError, match=r"is not a checkpoint of `atm fit` \(no Lightning state\); .* --model.weights"):
        check_resume_checkpoint(plain)


def test_files_that_hold_no_state_dict_say_so(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "notes": "no tensors"}, path)
    with pytest.raises(ValueError, match=r"holds no state dict of tensors \(found \['epoch', 'notes'\]\)"):
        create_model(NAME, weights=str(path))


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
    with pytest.raises(ValueError, match=r"pass --model.num_classes 7 to use it, or --model.new_head true"):
        create_model(NAME, weights=str(path), num_classes=1000)
    renewed = create_model(NAME, weights=str(path), num_classes=3, new_head=True)
    assert_same_weights(renewed, create_model(NAME, weights=str(path), num_classes=7), skip="head.")


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


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"depth": 4}, r"4 blocks.*12 blocks.*set --model.model_kwargs '\{depth: 4\}'"),
        ({"num_classes": 3}, r"--model.num_classes 3"),
    ],
)
def test_weights_of_another_depth_or_head_name_the_setting(tmp_path: Path, kwargs, hint) -> None:
    path = tmp_path / "trained.pth"
    torch.save(timm.create_model(NAME, **kwargs).state_dict(), path)
    with pytest.raises(ValueError, match=hint):
        create_model(NAME, weights=str(path), num_classes=1000)


def test_pretrained_offline_points_to_local_weights() -> None:
    with pytest.raises(RuntimeError, match=r"--model.weights"):
        create_model(NAME, pretrained=True)
