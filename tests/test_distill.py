"""Self-distillation (``--model.distill``): what trains, the teacher, the loss, resume, DDP and the command.

The teacher is a random 4-block ViT at 64 px (8 px patches, 65 tokens) whose attention and MLP
weights are scaled up, so that its outputs depend on the patches and ToMe r=14 (65 tokens down
to 9) changes some of its predictions: something for distillation to win back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from atm_lightning import ATM, NoMerge, ToMe, merge_stats, patch
from atm_lightning.callbacks import EMA
from atm_lightning.cli import ATMCLI
from atm_lightning.data import ImageNetDataModule
from atm_lightning.delta import read_delta
from atm_lightning.distill import Distillation, teacher_logits, trainable_names
from atm_lightning.lora import fold_state_dict
from atm_lightning.models import create_model
from atm_lightning.module import TokenMergingModule
from tests.fakedata import make_image_folder
from tests.helpers import CONFIGS, blocky_images, save_weights

NAME = "vit_tiny_patch16_224"
SMALL = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}
CLASSES = 10
MERGER = ToMe(r=14)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=CLASSES, **SMALL)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(30)
            for layer in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                layer.weight.mul_(10)
        model.head.weight.mul_(10)
    return save_weights(model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return blocky_images(48, size=64)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/: 9 images in 3 class folders a 10-class head cannot number (labels unknown);
    val/: 3 labelled images, numbered by the class_names file."""
    root = tmp_path_factory.mktemp("distill_data")
    make_image_folder(root / "train", ["cat", "dog", "fox"], per_class=3, seed=1)
    make_image_folder(root / "val", ["cat", "dog", "fox"], per_class=1)
    (root / "classes.txt").write_text("\n".join(["cat", "dog", "fox", *(f"other{i}" for i in range(7))]) + "\n")
    return root


def module(teacher: Path, merger=MERGER, **settings) -> TokenMergingModule:
    torch.manual_seed(0)
    options = {"lr": 1e-3, "lr_base_batch": None, "weight_decay": 0.0, **settings}
    distill = options.pop("distill", Distillation())
    return TokenMergingModule(
        NAME, weights=str(teacher), num_classes=CLASSES, model_kwargs=SMALL, merger=merger, distill=distill, **options
    )


def datamodule(root: Path, **settings) -> ImageNetDataModule:
    options = {"batch_size": 4, "num_workers": 0, "train_labels": False, "class_names": str(root / "classes.txt"), **settings}
    return ImageNetDataModule(str(root), model_name=NAME, num_classes=CLASSES, img_size=64, **options)


def trainer(tmp_path: Path, callbacks: list[Callback] = (), **settings) -> pl.Trainer:
    options = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
        "default_root_dir": tmp_path,
        "enable_checkpointing": any(isinstance(cb, ModelCheckpoint) for cb in callbacks), **settings,
    }  # fmt: skip
    return pl.Trainer(callbacks=list(callbacks), **options)


def fidelity(tm: TokenMergingModule, images: torch.Tensor) -> tuple[float, float]:
    """Agreement (share of top-1 classes kept) and mean KL of the merged module from its teacher."""
    training = tm.training
    with torch.no_grad():
        student = tm.eval().model(images)
    teacher = teacher_logits(tm, images)
    tm.train(training)
    log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return float((student.argmax(-1) == teacher.argmax(-1)).float().mean()), kl


def unlabelled(images: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(images, torch.full((len(images),), -1)), batch_size=batch_size)


def test_the_merged_model_merges_alike_in_training_and_evaluation(teacher: Path, images: torch.Tensor) -> None:
    """Distillation trains what evaluation runs: with the exact rule, training mode (with a graph)
    makes the merges evaluation makes, and the same logits; so does the class-token-only last
    block. Reruns act at inference only."""
    model = create_model(NAME, weights=str(teacher), num_classes=CLASSES, model_kwargs=SMALL)
    atm = ATM(alpha=1.0, beta=0.3, theta_min=0.3, split_layer=3)
    patch(model, atm, record_merges=True)
    with torch.no_grad():
        evaluated = model.eval()(images)
    in_eval = merge_stats(model)
    trained = model.train()(images)
    in_training = merge_stats(model)
    assert trained.requires_grad and len(set(in_eval.tokens[:, -1].tolist())) > 3  # ragged batch
    assert torch.equal(in_training.tokens, in_eval.tokens)
    for a, b in zip(in_training.layers, in_eval.layers, strict=True):
        assert torch.equal(a.selected.sum(1), b.selected.sum(1))
    assert torch.allclose(trained, evaluated, atol=1e-5, rtol=0)
    patch(model, dataclasses.replace(atm, last_block_prefix_only=True, rerun_margin=0.0), fused=False)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), evaluated, atol=1e-5, rtol=0)


def test_distillation_lowers_kl_and_wins_back_agreement(teacher: Path, images: torch.Tensor, tmp_path: Path) -> None:
    tm = module(teacher)  # LayerNorms and biases, lr 1e-3
    agreement, kl = fidelity(tm, images)
    assert agreement < 0.9 and kl > 0.03  # merging moved the predictions
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, [Losses()], max_epochs=10).fit(tm, train_dataloaders=unlabelled(images, 16))
    after, kl_after = fidelity(tm, images)
    assert losses[-1] < 0.7 * losses[0]
    assert kl_after < 0.7 * kl and after > agreement


@pytest.mark.parametrize("trainable", ["all", "norms_biases", "lora", "lora+norms_biases"])
def test_each_parameter_set_trains_exactly_its_tensors(trainable: str, teacher: Path, images: torch.Tensor, tmp_path: Path) -> None:
    tm = module(teacher, distill=Distillation(trainable=trainable, lora_rank=2))
    before = {name: value.clone() for name, value in fold_state_dict(tm.model.state_dict()).items()}
    trainer(tmp_path, max_steps=2).fit(tm, train_dataloaders=unlabelled(images[:8], 4))
    after = fold_state_dict(tm.model.state_dict())
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    expected = set(trainable_names(timm.create_model(NAME, num_classes=CLASSES, **SMALL), trainable))
    assert changed == expected
    trains = {name for name, param in tm.model.named_parameters() if param.requires_grad}
    adapted = {name for name in expected if "lora" in trainable and name.endswith(("qkv.weight", "fc1.weight", "fc2.weight"))}
    assert {name for name in trains if "lora_" not in name} == expected - adapted  # adapted weights stay frozen
    assert {name for name in trains if "lora_" in name} == {
        name.removesuffix(".weight") + f".parametrizations.weight.0.lora_{factor}" for name in adapted for factor in "ab"
    }


def test_norms_and_biases_of_vit_ti_are_31k_values() -> None:
    model = timm.create_model(NAME)
    names = trainable_names(model, "norms_biases")
    assert sum(model.get_parameter(name).numel() for name in names) == 31_528
    assert "pos_embed" not in names and "cls_token" not in names and "blocks.0.attn.qkv.weight" not in names


def test_the_teacher_is_the_unmerged_base_model_and_lora_folds_exactly(teacher: Path, images: torch.Tensor) -> None:
    tm = module(teacher, distill=Distillation(trainable="lora+norms_biases", lora_rank=3)).eval()
    with torch.no_grad():
        for name, param in tm.model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # as if trained: adapters and biases moved
    base = create_model(NAME, weights=str(teacher), num_classes=CLASSES, model_kwargs=SMALL).eval()
    with torch.no_grad():
        assert torch.equal(teacher_logits(tm, images), base(images))
        folded = timm.create_model(NAME, num_classes=CLASSES, **SMALL).eval()
        folded.load_state_dict(fold_state_dict(tm.model.state_dict()))
        assert torch.equal(patch(folded, MERGER)(images), tm.model(images))
    assert not torch.equal(base.blocks[0].attn.qkv.weight, folded.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("merger", [NoMerge(), ATM(batch_rule="min")], ids=["dense", "min-rule"])
def test_settings_distillation_cannot_honour_are_refused(merger, teacher: Path) -> None:
    with pytest.raises(ValueError, match="merger must merge|batch_rule exact"):
        module(teacher, merger=merger)
    with pytest.raises(ValueError, match="drop --model.new_head"):
        module(teacher, new_head=True)
    with pytest.raises(ValueError, match="trainable is one of"):
        Distillation(trainable="heads")


def test_unlabelled_training_images_need_distillation(root: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    for path in sorted((root / "train").rglob("*.JPEG"))[:3]:
        (flat / "train" / path.name).symlink_to(path)
    dm = datamodule(flat)
    assert [label for _, label in dm.labelled_images("train", labels_needed=False)] == [-1] * 3
    with pytest.raises(ValueError, match="no class folders"):
        dm.labelled_images("train")
    dm = datamodule(tmp_path / "unnumbered", class_names=None)
    make_image_folder(tmp_path / "unnumbered" / "train", ["cat"], per_class=2)
    assert [label for _, label in dm.labelled_images("train", labels_needed=False)] == [-1, -1]


class FinalState(Callback):
    """Each rank's weights, EMA and step at the end of training (ddp_fork keeps only rank 0's module)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        state = {"step": trainer.global_step, "weights": dict(pl_module.model.state_dict()), "ema": ema.ema}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


class Interrupt(Callback):
    """Ends the run after its first epoch, as if it had been stopped there (the schedule stays that of the whole run)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def distill_run(teacher: Path, root: Path, folder: Path, *extra: Callback, ckpt_path: Path | None = None, **settings) -> dict:
    """Two epochs of LoRA distillation with augmentation, mixup, drop-path and EMA; the final state."""
    pl.seed_everything(0)
    folder.mkdir(parents=True, exist_ok=True)
    tm = module(teacher, distill=Distillation(trainable="lora+norms_biases", lora_rank=2, delta=str(folder / "delta.safetensors")),
                mixup_alpha=0.8, cutmix_alpha=1.0, drop_path_rate=0.1)  # fmt: skip
    callbacks = [EMA(decay=0.5), ModelCheckpoint(dirpath=folder, save_last=True), FinalState(folder), *extra]
    trainer(folder, callbacks, max_epochs=2, **settings).fit(tm, datamodule=datamodule(root), ckpt_path=ckpt_path)
    return torch.load(folder / "rank0.pt", weights_only=True)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(teacher: Path, root: Path, tmp_path: Path) -> None:
    straight = distill_run(teacher, root, tmp_path / "straight")
    distill_run(teacher, root, tmp_path / "first", Interrupt())
    resumed = distill_run(teacher, root, tmp_path / "resumed", ckpt_path=tmp_path / "first" / "last.ckpt")
    assert straight["step"] == resumed["step"] == 4  # 9 images in 2 batches of 4, 2 epochs
    for name, value in straight["weights"].items():
        assert torch.equal(value, resumed["weights"][name]), name
        assert torch.equal(straight["ema"][name], resumed["ema"][name]), name
    deltas = [read_delta(tmp_path / run / "delta.safetensors") for run in ("straight", "resumed")]
    assert deltas[0].info == deltas[1].info and deltas[0].names == deltas[1].names
    assert all(torch.equal(deltas[0].dense[name], deltas[1].dense[name]) for name in deltas[0].dense)
    assert all(torch.equal(a, b) for name in deltas[0].low_rank for a, b in zip(deltas[0].low_rank[name], deltas[1].low_rank[name]))


def test_two_ddp_ranks_distill_identically(teacher: Path, root: Path, tmp_path: Path) -> None:
    final = distill_run(teacher, root, tmp_path, devices=2, strategy="ddp_fork")
    other = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert final["step"] == other["step"] == 2  # 5 images a rank an epoch: one batch of 4
    for name, value in final["weights"].items():
        assert torch.equal(value, other["weights"][name]), name
        assert torch.equal(final["ema"][name], other["ema"][name]), name


def cli(*args: str) -> ATMCLI:
    with mock.patch("sys.argv", ["atm"]):
        return ATMCLI(args=list(args))


def test_atm_fit_distils_writes_a_delta_and_validate_applies_it(teacher: Path, root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        "--config", str(CONFIGS / "vit_t_tome.yaml"), "--model.weights", str(teacher),
        "--model.num_classes", str(CLASSES), "--model.model_kwargs", json.dumps(SMALL), "--model.merger.r", "14",
        "--data.img_size", "64", "--data.root", str(root), "--data.class_names", str(root / "classes.txt"),
        "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    fitted = cli(
        "fit", *common, "--model.distill.trainable", "lora", "--model.distill.lora_rank", "2",
        "--model.lr", "1e-3", "--model.lr_base_batch", "null", "--trainer.max_steps", "2",
        "--trainer.callbacks+=atm_lightning.callbacks.EMA", "--trainer.callbacks.decay", "0.5",
    )  # fmt: skip
    run = tmp_path / "runs" / "vit_t_tome" / "version_0"
    delta = run / "delta.safetensors"
    assert f"wrote {delta}" in capsys.readouterr().out
    assert delta.stat().st_size < 64 * 1024  # the factors (12 layers at rank 2), not the weights
    assert list(run.glob("events.out.tfevents.*")) and fitted.trainer.global_step == 2  # one epoch, then validation
    validated = cli("validate", *common, "--model.delta", str(delta))
    fit_val, val = fitted.model.results["val"], validated.model.results["val"]
    assert val["agreement"] == fit_val["agreement"] and val["kl"] == pytest.approx(fit_val["kl"], rel=1e-5)
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    from_checkpoint = cli("validate", *common, "--model.weights", str(checkpoint))  # adapters folded on load
    assert torch.equal(from_checkpoint.model.predictions["val"], validated.model.predictions["val"])
