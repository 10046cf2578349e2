"""Fine-tuning with merging active: the recipe pieces, gradients, checkpoints, resume, EMA and DDP.

Models are randomly initialised DeiT-Ti at 224 px with a 3-class head, cut to 4 blocks where training
through Lightning (SMALL), on a few generated images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import timm
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atm_lightning import ATM, NoMerge, ToMe, merge_stats, patch
from atm_lightning.callbacks import EMA
from atm_lightning.cli import ATMCLI
from atm_lightning.data import ImageNetDataModule
from atm_lightning.merge import EViT
from atm_lightning.models import create_model
from atm_lightning.module import TokenMergingModule
from atm_lightning.trainer import check_accelerator, fit_precision
from atm_lightning.training import param_groups, scaled_lr, set_drop_path, warmup_cosine
from tests.helpers import CONFIGS

NAME = "deit_tiny_patch16_224"
SMALL = {"depth": 4}  # DeiT-Ti blocks, 4 of them: the Lightning tests train and reload quickly
FT_CONFIGS = sorted(p.name for p in CONFIGS.glob("*_ft.yaml"))


@pytest.fixture(scope="module")
def fixed_batch(train_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 val images, eval-preprocessed, and the first one mirrored: 4 images, labels 0 1 2 0."""
    dm = datamodule(train_root, batch_size=3)
    dm.setup("validate")
    images, labels = next(iter(dm.val_dataloader()))
    return torch.cat([images, images[:1].flip(-1)]), torch.cat([labels, labels[:1]])


def datamodule(root: Path, batch_size: int = 2) -> ImageNetDataModule:
    return ImageNetDataModule(str(root), model_name=NAME, num_classes=3, batch_size=batch_size, num_workers=0)


def module(**kwargs) -> TokenMergingModule:
    torch.manual_seed(0)
    settings = {"merger": ToMe(r=8), "lr_base_batch": None, "lr": 1e-4, **kwargs}
    return TokenMergingModule(NAME, num_classes=3, model_kwargs=SMALL, **settings)


def trainer(tmp_path: Path, callbacks: list[Callback] = (), **kwargs) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        "enable_checkpointing": any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        **kwargs,
    }
    return pl.Trainer(callbacks=list(callbacks), **settings)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


# --- recipe pieces -------------------------------------------------------------------------------


def test_param_groups_exempt_norms_biases_and_tokens() -> None:
    model = timm.create_model(NAME, num_classes=3)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    # patch-embed conv + 4 matrices per block x 12 + head
    assert len(decayed) == 1 + 4 * 12 + 1
    assert {"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight", "head.bias"} <= exempt
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.11.mlp.fc2.bias"} <= exempt
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_lr_scaling_and_warmup_cosine_schedule() -> None:
    assert scaled_lr(5e-4, 1024, 512) == pytest.approx(1e-3)
    assert scaled_lr(1e-5, 64, 512) == pytest.approx(1.25e-6)
    factor = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(9) == pytest.approx(0.5)  # half-way through the 10 cosine steps
    assert factor(14) == pytest.approx(0.0, abs=1e-12)


def test_drop_path_rises_linearly_over_blocks() -> None:
    model = set_drop_path(timm.create_model(NAME, num_classes=3), 0.11)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    rates = [block.drop_path2.drop_prob for block in model.blocks[1:]]
    assert rates == pytest.approx([0.01 * i for i in range(1, 12)])
    assert all(isinstance(block.drop_path1, DropPath) for block in model.blocks[1:])


@pytest.mark.parametrize(
    "merger",
    [
        ToMe(r=8, prop_attn=False),
        ATM(alpha=0.9, beta=0.05, theta_min=0.3, split_layer=10),
        EViT(keep_rate=0.7),
    ],
    ids=["tome", "atm-ragged", "evit"],
)
def test_merging_model_backpropagates_with_drop_path(merger, fixed_batch) -> None:
    torch.manual_seed(0)
    model = patch(set_drop_path(timm.create_model(NAME, num_classes=3), 0.1), merger).train()
    images, labels = fixed_batch
    nn.functional.cross_entropy(model(images), labels).backward()
    final = merge_stats(model).tokens[:, -1]
    assert int(final.max()) < 197  # merging happened in training mode
    if isinstance(merger, ATM):
        assert len(set(final.tolist())) > 1  # ragged: padded batch, masked attention
    else:
        assert len(set(final.tolist())) == 1
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


# --- training through Lightning ------------------------------------------------------------------


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_goes_down_on_a_fixed_batch_with_tome(tmp_path: Path, fixed_batch) -> None:
    tm = module(lr=1e-4, label_smoothing=0.0)
    recorder = LossRecorder()
    loader = DataLoader(TensorDataset(*fixed_batch), batch_size=4)
    trainer(tmp_path, [recorder], max_steps=6).fit(tm, train_dataloaders=loader)
    first, last = recorder.losses[0], recorder.losses[-1]
    assert first == pytest.approx(math.log(3), abs=0.3)  # an untrained 3-way head
    assert last < 0.2 * first, recorder.losses
    assert merge_stats(tm.model).tokens[0, -1] == 197 - 8 * 4


def test_mixup_soft_targets_and_plain_labels(train_root: Path, tmp_path: Path, fixed_batch) -> None:
    plain = module(label_smoothing=0.1)
    assert plain.mixup is None and plain.criterion.label_smoothing == 0.1
    mixed = module(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    assert isinstance(mixed.criterion, SoftTargetCrossEntropy)
    images, labels = fixed_batch
    _, soft = mixed.mixup(images.clone(), labels)
    assert soft.shape == (4, 3)
    assert soft.sum(1) == pytest.approx(torch.ones(4))
    assert float(soft.min()) >= 0.1 / 3 - 1e-6  # smoothing floor
    # Batch 4 is mixed with its flip: image 0 with image 3 (both class 0), 1 with 2.
    assert soft[0, 0] == pytest.approx(1 - 0.1 + 0.1 / 3) and soft[1, 1] == pytest.approx(soft[2, 2])
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(mixed, datamodule=datamodule(train_root, batch_size=2))
    assert t.global_step == 1 and math.isfinite(float(t.callback_metrics["train/loss"]))
    assert "train/top1" not in t.callback_metrics  # mixed images have no single label


def test_mixup_with_odd_batch_names_the_fix(train_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"batch must be even .*--data.batch_size"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
            module(mixup_alpha=0.8), datamodule=datamodule(train_root, batch_size=3)
        )


class StopAfterFirstStep(Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = True


def test_optimizer_uses_scaled_lr_and_decay_groups(train_root: Path, tmp_path: Path) -> None:
    tm = module(lr=1e-3, lr_base_batch=512, warmup_epochs=1.0, weight_decay=0.05)
    t = trainer(tmp_path, [StopAfterFirstStep()], max_steps=20, limit_val_batches=0)
    t.fit(tm, datamodule=datamodule(train_root, batch_size=2))
    assert t.global_step == 1
    groups = t.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in groups] == [18, 38]  # 4 blocks: 1 + 4 * 4 + 1 and 8 * 4 + 6
    peak = 1e-3 * 2 / 512
    assert groups[0]["initial_lr"] == pytest.approx(peak)
    # 6 train images in batches of 2: a 3-step warm-up epoch; after step 1 the factor is 2/4.
    assert groups[0]["lr"] == pytest.approx(peak * 2 / 4)


def test_warmup_in_steps_and_epochs_is_refused() -> None:
    with pytest.raises(ValueError, match="steps or in epochs, not both"):
        module(warmup_steps=5, warmup_epochs=1.0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr": -1.0}, r"--model.lr must be > 0, got -1.0"),  # stopped in torch's AdamW with a traceback
        ({"label_smoothing": 2.0}, r"--model.label_smoothing must be in \[0, 1\), got 2.0"),  # trained on it
        ({"weight_decay": -0.1}, r"--model.weight_decay must be >= 0"),
        ({"warmup_steps": -1}, r"the warm-up must be >= 0"),
    ],
)
def test_recipe_settings_out_of_range_are_refused(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        module(**setting)


# --- EMA, checkpoints and resume -----------------------------------------------------------------


class HeadRecorder(Callback):
    """The head weight after every optimizer step (runs after EMA's update, same hook)."""

    def __init__(self) -> None:
        self.heads: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.heads.append(pl_module.model.head.weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.heads.append(pl_module.model.head.weight.detach().clone())


def test_ema_tracks_the_weights_and_is_validated_and_saved(train_root: Path, tmp_path: Path) -> None:
    tm = module(lr=1e-3)
    ema, heads = EMA(decay=0.5), HeadRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [ema, heads, checkpoint], max_steps=3)  # one epoch of 3 batches
    dm = datamodule(train_root)
    t.fit(tm, datamodule=dm)
    expected = heads.heads[0]
    for head in heads.heads[1:]:
        expected = 0.5 * expected + 0.5 * head
    assert torch.allclose(ema.ema["head.weight"], expected, atol=1e-7)
    raw = weights_of(tm.model)
    assert not torch.equal(ema.ema["head.weight"], raw["head.weight"])

    # Validation runs on the EMA weights and gives the raw ones back afterwards.
    t.validate(tm, datamodule=dm)
    with_ema = tm.results["val"]
    assert all(torch.equal(v, tm.model.state_dict()[k]) for k, v in raw.items())
    plain = module()
    plain.model.load_state_dict(ema.ema)
    trainer(tmp_path).validate(plain, datamodule=dm)
    assert with_ema["top1"] == plain.results["val"]["top1"]
    assert with_ema["loss"] == pytest.approx(plain.results["val"]["loss"], rel=1e-9)

    # The checkpoint's model weights are the EMA's; the raw ones ride in the callback state.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert torch.equal(saved["state_dict"]["model.head.weight"], ema.ema["head.weight"])
    assert torch.equal(saved["callbacks"]["EMA"]["raw"]["head.weight"], raw["head.weight"])
    loaded = create_model(NAME, weights=str(tmp_path / "ckpt" / "last.ckpt"), num_classes=3, model_kwargs=SMALL)
    assert torch.equal(loaded.head.weight, ema.ema["head.weight"])


class StateAtFitStart(Callback):
    """The model's and the EMA's weights once every callback's on_fit_start has run (EMA's first)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        (ema,) = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        self.weights = weights_of(pl_module.model)
        self.ema = {name: value.clone() for name, value in ema.ema.items()}


def test_resume_restores_raw_weights_ema_and_step(train_root: Path, tmp_path: Path) -> None:
    # Reading a .ckpt through --model.weights first must not break resuming (safe-globals regression).
    torch.save({"model": timm.create_model(NAME, num_classes=3).state_dict()}, tmp_path / "w.pth")
    create_model(NAME, weights=str(tmp_path / "w.pth"), num_classes=3)
    dm = datamodule(train_root)
    ema = EMA(decay=0.5)
    first = module(lr=1e-3)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [ema, saver], max_steps=2, limit_val_batches=0).fit(first, datamodule=dm)
    raw, average = weights_of(first.model), {k: v.clone() for k, v in ema.ema.items()}
    last = tmp_path / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2

    resumed, start = module(lr=1e-3), StateAtFitStart()
    t = trainer(tmp_path / "resumed", [EMA(decay=0.5), start], max_steps=3, limit_val_batches=0)
    t.fit(resumed, datamodule=dm, ckpt_path=last)
    assert t.global_step == 2 + 1
    # Training went on from the raw weights (the file's state_dict holds the EMA ones) and the average.
    assert all(torch.equal(value, start.weights[name]) for name, value in raw.items())
    assert all(torch.equal(value, start.ema[name]) for name, value in average.items())
    assert not torch.equal(raw["head.weight"], average["head.weight"])


def test_checkpoint_reloads_with_identical_logits_under_any_merger(
    train_root: Path, tmp_path: Path, fixed_batch
) -> None:
    tm = module(lr=1e-3, drop_path_rate=0.1)
    t = trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_steps=2, limit_val_batches=0)
    t.fit(tm, datamodule=datamodule(train_root))
    ckpt = str(tmp_path / "last.ckpt")
    images = fixed_batch[0]
    with torch.no_grad():
        want = tm.model.eval()(images)
        loaded = create_model(NAME, weights=ckpt, num_classes=3, model_kwargs=SMALL).eval()
        assert torch.equal(patch(loaded, ToMe(r=8))(images), want)
        for merger in (ATM(alpha=0.9, beta=0.05, theta_min=0.5, split_layer=3), NoMerge()):
            evaluated = TokenMergingModule(NAME, weights=ckpt, num_classes=3, merger=merger, model_kwargs=SMALL).eval()
            reference = timm.create_model(NAME, num_classes=3, **SMALL)
            reference.load_state_dict(tm.model.state_dict())
            # The module's default fused="auto" runs ATM's compiled step, whose merged tokens
            # round differently from the eager one's: the reference runs the same step.
            assert torch.equal(evaluated(images), patch(reference.eval(), merger, fused="auto")(images))


# --- the real entry point and the shipped configs ------------------------------------------------


def cli(*args: str) -> ATMCLI:
    with mock.patch("sys.argv", ["atm"]):
        return ATMCLI(args=list(args))


def cpu_args(config: str, root: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    return [
        subcommand,
        "--config",
        str(CONFIGS / config),
        "--model.pretrained",
        "false",
        "--model.num_classes",
        "3",
        "--data.root",
        str(root),
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


@pytest.mark.parametrize("config", FT_CONFIGS)
def test_ft_configs_train_with_the_deit_recipe(config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("fit", "--config", str(CONFIGS / config), "--data.root", "R", "--print_config")
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    best, last = printed["trainer"]["callbacks"][:2]
    assert best["class_path"].endswith("ModelCheckpoint") and last["class_path"].endswith("ModelCheckpoint")
    assert best["init_args"]["monitor"] == "val/top1" and best["init_args"]["mode"] == "max"
    assert last["init_args"]["monitor"] is None and last["init_args"]["filename"] == "last"
    model = printed["model"]
    assert model["merger"]["init_args"]["prop_attn"] is False
    assert (model["mixup_alpha"], model["cutmix_alpha"], model["label_smoothing"]) == (0.8, 1.0, 0.1)
    assert model["lr_base_batch"] == 512 and model["drop_path_rate"] == 0.1
    trainer_settings = printed["trainer"]
    assert (trainer_settings["accelerator"], trainer_settings["devices"], trainer_settings["strategy"]) == ("auto",) * 3
    assert trainer_settings["precision"] is None  # chosen for the device (fit_precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the configs take every GPU")
def test_ft_config_runs_on_a_machine_without_a_gpu(train_root: Path, tmp_path: Path, monkeypatch) -> None:
    # Was: "No supported gpu backend found!"; the CPU overrides were only in the docs.
    monkeypatch.chdir(tmp_path)
    small = ("--model.model_kwargs", '{"depth": 2}', "--data.batch_size", "2", "--data.num_workers", "0")
    fitted = cli("fit", "--config", str(CONFIGS / "vit_t_tome_ft.yaml"), "--model.pretrained", "false",
                 "--model.num_classes", "3", "--data.root", str(train_root), *small, "--trainer.max_steps", "1",
                 "--trainer.enable_progress_bar", "false")  # fmt: skip
    trainer = fitted.trainer
    assert trainer.global_step == 1 and trainer.world_size == 1
    assert type(trainer.accelerator).__name__ == "CPUAccelerator" and trainer.precision == "32-true"


def test_fit_precision_follows_the_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fit_precision("auto") == fit_precision("cpu") == "32-true"
    with pytest.raises(ValueError, match=r"--trainer.accelerator gpu, but torch finds no GPU .* --trainer.accelerator auto"):
        check_accelerator("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, precision in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert fit_precision("auto") == fit_precision("gpu") == precision
    assert fit_precision("cpu") == "32-true"
    check_accelerator("gpu")


def test_fit_a_new_head_on_1000_class_weights(train_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    imagenet = timm.create_model(NAME, depth=2)
    weights = tmp_path / "deit_t_1000.pth"
    torch.save(imagenet.state_dict(), weights)
    small = ("--model.weights", str(weights), "--model.model_kwargs", '{"depth": 2}')
    args = (*small, "--trainer.max_steps", "1")
    with pytest.raises(ValueError, match=r"1000-class classifier but --model.num_classes is 3"):
        cli(*cpu_args("deit_t_tome_ft.yaml", train_root, *args))
    fitted = cli(*cpu_args("deit_t_tome_ft.yaml", train_root, *args, "--model.new_head", "true"))
    assert fitted.trainer.global_step == 1
    (last,) = tmp_path.glob("runs/*/version_0/checkpoints/last.ckpt")
    tuned = create_model(NAME, weights=str(last), num_classes=3, model_kwargs={"depth": 2})
    assert tuned.head.out_features == 3  # the checkpoint's own head now
    # One AdamW step at lr ~4e-8 (1e-5 x 2 / 512) leaves the backbone close to the file's.
    assert torch.allclose(tuned.blocks[1].mlp.fc1.weight, imagenet.blocks[1].mlp.fc1.weight, atol=1e-6)
    with pytest.raises(SystemExit):
        validate = cpu_args("deit_t_tome.yaml", train_root, *small, subcommand="validate")
        cli(*validate, "--model.new_head", "true")


def test_last_checkpoint_is_the_latest_epoch_even_without_a_new_best(train_root: Path, tmp_path: Path, monkeypatch) -> None:
    """Resuming from last.ckpt must go on from the last epoch. With ModelCheckpoint(save_last=True)
    on the val/top1 checkpoint, Lightning rewrote last.ckpt only when a new best was saved."""
    monkeypatch.chdir(tmp_path)
    small = ("--model.model_kwargs", '{"depth": 2}', "--model.lr", "1e-12")  # lr ~0: val/top1 never improves
    cli(*cpu_args("deit_t_tome_ft.yaml", train_root, *small, "--trainer.max_epochs", "2"))
    folder = next(tmp_path.glob("runs/*/version_0/checkpoints"))
    (best,) = folder.glob("best-*.ckpt")
    assert best.name == "best-epoch=000.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [best.name, "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 1


@pytest.mark.slow
def test_atm_fit_resume_and_validate_from_the_ft_config(train_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fitted = cli(
        *cpu_args(
            "deit_t_tome_ft.yaml",
            train_root,
            "--trainer.max_steps",
            "3",  # one epoch of 3 batches, then validation picks the best checkpoint
            "--trainer.callbacks+=atm_lightning.callbacks.EMA",
            "--trainer.callbacks.decay",
            "0.5",
        )
    )
    run = tmp_path / "runs" / "deit_t_tome_ft" / "version_0" / "checkpoints"
    (best,) = run.glob("best-*.ckpt")
    assert (run / "last.ckpt").is_file() and fitted.trainer.global_step == 3
    fit_val = fitted.model.results["val"]
    assert fit_val["num_images"] == 3

    resumed = cli(
        *cpu_args("deit_t_tome_ft.yaml", train_root, "--trainer.max_steps", "4"),
        "--trainer.callbacks+=atm_lightning.callbacks.EMA",  # resume an EMA run with EMA
        "--trainer.callbacks.decay",
        "0.5",
        "--ckpt_path",
        str(run / "last.ckpt"),
    )
    assert resumed.trainer.global_step == 3 + 1

    validated = cli(
        *cpu_args("deit_t_tome.yaml", train_root, subcommand="validate"),
        "--model.weights",
        str(best),
        "--model.merger.init_args.prop_attn",
        "false",
    )
    row = json.loads(next((tmp_path / "runs" / "deit_t_tome").glob("version_*/metrics.json")).read_text())
    assert row["num_images"] == 3 and row["merger"]["prop_attn"] is False
    assert row["top1"] == fit_val["top1"]
    assert row["loss"] == pytest.approx(fit_val["loss"], rel=1e-6)
    assert validated.model.results["val"]["tokens_per_layer"] == [197 - 13 * i for i in range(13)]


# --- DDP -----------------------------------------------------------------------------------------


class SaveRankWeights(Callback):
    """Each rank writes its final weights and step: ddp_fork returns only rank 0's state to the parent."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        (ema,) = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        state = {"step": trainer.global_step, "weights": weights_of(pl_module.model), "ema": ema.ema}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_fork_two_ranks_train_identically(train_root: Path, tmp_path: Path) -> None:
    tm = module(lr=1e-3, mixup_alpha=0.8, cutmix_alpha=1.0, drop_path_rate=0.1)
    before = weights_of(tm.model)
    t = trainer(
        tmp_path, [SaveRankWeights(tmp_path), EMA(decay=0.5)], devices=2, strategy="ddp_fork",
        max_steps=2, limit_val_batches=0,
    )
    t.fit(tm, datamodule=datamodule(train_root))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name]), name
    assert not torch.equal(ranks[0]["weights"]["head.weight"], before["head.weight"])


def test_warmup_in_epochs_counts_the_last_shorter_accumulation(tmp_path: Path, train_root: Path) -> None:
    # 6 training images in batches of 2: 3 batches an epoch, accumulated by 2 into 2 optimizer steps.
    lrs: list[float] = []

    class RecordLr(Callback):
        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    run = trainer(tmp_path, [RecordLr()], max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0)
    run.fit(module(warmup_epochs=1.0), datamodule=datamodule(train_root))
    steps = sorted(set(lrs), key=lrs.index)  # the lr of each optimizer step, in order
    assert steps[:3] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4])  # warm-up over the 2 steps of one epoch


def test_a_training_set_smaller_than_the_batch_is_refused(tmp_path: Path, train_root: Path) -> None:
    with pytest.raises(ValueError, match="no training batch.*--data.batch_size 8.*lower --data.batch_size"):
        trainer(tmp_path, max_epochs=1).fit(module(), datamodule=datamodule(train_root, batch_size=8))
