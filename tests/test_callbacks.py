"""TensorBoard callbacks: read the event file back and check the numbers and pictures in it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from atm_lightning import ToMe
from atm_lightning.callbacks import MergeStatsCallback, MergeVisualizationCallback
from atm_lightning.data import ImageNetDataModule
from atm_lightning.module import TokenMergingModule

NAME = "vit_tiny_patch16_224"


def validate(root: Path, logger) -> TokenMergingModule:
    torch.manual_seed(0)
    module = TokenMergingModule(NAME, num_classes=3, merger=ToMe(r=8))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MergeStatsCallback(), MergeVisualizationCallback(num_images=4)],
    )
    dm = ImageNetDataModule(str(root), model_name=NAME, num_classes=3, batch_size=3, num_workers=0)
    trainer.validate(module, datamodule=dm)
    return module


def test_tensorboard_holds_layers_histogram_layout_hparams_and_picture(
    tmp_path: Path, data_root: Path
) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    module = validate(data_root, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for layer in range(13):
        assert {f"merge/tokens_l{layer:02d}", f"merge/kept_ratio_l{layer:02d}"} <= scalars
    assert events.Scalars("merge/tokens_l12")[0].value == 101  # 197 - 12 * 8
    assert events.Scalars("merge/kept_ratio_l12")[0].value == pytest.approx(101 / 197)
    assert events.Scalars("merge/gflops")[0].value == pytest.approx(module.results["val"]["gflops"])
    assert {"val/top1", "val/gflops", "merge/flops_reduction"} <= scalars

    histogram = events.Histograms("merge/final_tokens")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (8, 101, 101)

    (image,) = events.Images("merge/groups")
    assert (image.width, image.height) == (4 * 224 + 5 * 2, 2 * 224 + 3 * 2)  # 4 originals above 4 paintings

    assert "custom_scalars__config__" in events.Tags()["tensors"]
    hparams = events.PluginTagToContent("hparams")
    assert b"merger/r" in hparams["_hparams_/session_start_info"]
    assert b"val/top1" in hparams["_hparams_/experiment"]

    # The picture traced sources with another merger; the module's own is back in place.
    assert module.model._merging.policy is module.merger and module.merger.trace_source is False


def test_without_tensorboard_the_callbacks_stay_quiet(tmp_path: Path, data_root: Path) -> None:
    module = validate(data_root, CSVLogger(tmp_path))
    assert module.results["val"]["num_images"] == 8
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_visualization_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="num_images"):
        MergeVisualizationCallback(num_images=0)


def test_fit_writes_each_evaluation_at_lightnings_step_and_the_prefix_block_input(tmp_path: Path, train_root: Path) -> None:
    torch.manual_seed(0)
    merger = ToMe(r=8, last_block_prefix_only=True)  # the last block computes the class token alone
    module = TokenMergingModule(NAME, num_classes=3, merger=merger, lr=1e-4, warmup_steps=0)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator="cpu", logger=logger, max_epochs=2, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[MergeStatsCallback()],
    )  # fmt: skip
    trainer.fit(module, datamodule=ImageNetDataModule(str(train_root), model_name=NAME, num_classes=3, batch_size=2, num_workers=0))
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    # 3 optimizer steps an epoch; the HParams entry repeats the first point at its step, never at 0
    val_steps = sorted({event.step for event in events.Scalars("val/top1")})
    assert val_steps == [2, 5]
    assert [event.step for event in events.Scalars("merge/gflops")] == val_steps
    histogram = events.Histograms("merge/final_tokens")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (3, 109, 109)  # 197 - 11 * 8 enter the last block
