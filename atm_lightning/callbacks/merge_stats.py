"""TensorBoard view of merging: tokens per layer, GFLOPs, the spread of final token counts, hparams."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.aggregation import CatMetric

from ..patch import merge_stats
from ._tensorboard import logged_step, stage_of, tensorboard_logger


class MergeStatsCallback(Callback):
    """Log what merging did in each evaluation of a ``TokenMergingModule`` to TensorBoard.

    Per layer: ``merge/tokens_lNN`` (mean tokens after NN blocks; l00 is the input) and
    ``merge/kept_ratio_lNN`` (the same over the input count), drawn together by a custom-scalars
    layout; ``merge/gflops*`` and ``merge/flops_reduction``; a histogram ``merge/final_tokens`` of
    the tokens each image ended with (entering the last block where that block computes the class
    token alone; for adaptive merging the spread is the point, a mean hides it);
    and once per run an HParams entry (model, weights, merger, preprocessing -> top1, gflops).
    Test runs use the prefix ``merge_test/``. Without a TensorBoard logger it does nothing.
    """

    def __init__(self) -> None:
        self._final_tokens = CatMetric()
        self._layout_written = False
        self._hparams_written = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._final_tokens.update(merge_stats(pl_module.model).final_tokens.float())

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._final_tokens.update(merge_stats(pl_module.model).final_tokens.float())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gathered = self._final_tokens.compute()  # every rank: compute() is a collective under DDP

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gathered = self._final_tokens.compute()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def _start(self, pl_module: LightningModule) -> None:
        self._final_tokens = self._final_tokens.to(pl_module.device)
        self._final_tokens.reset()

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage = stage_of(trainer)
        logger = tensorboard_logger(trainer)
        results = getattr(pl_module, "results", {}).get(stage)
        if trainer.sanity_checking or logger is None or results is None or not trainer.is_global_zero:
            return
        writer = logger.experiment
        step = logged_step(trainer)
        prefix = "merge" if stage == "val" else f"merge_{stage}"
        tokens = results["tokens_per_layer"]
        for layer, count in enumerate(tokens):
            writer.add_scalar(f"{prefix}/tokens_l{layer:02d}", count, step)
            writer.add_scalar(f"{prefix}/kept_ratio_l{layer:02d}", count / tokens[0], step)
        for key in ("gflops", "gflops_dense", "gflops_matching", "flops_reduction"):
            writer.add_scalar(f"{prefix}/{key}", results[key], step)
        writer.add_histogram(f"{prefix}/final_tokens", self._gathered.cpu(), step)
        if not self._layout_written:
            writer.add_custom_scalars(_layout())
            self._layout_written = True
        if not self._hparams_written:
            metrics = {f"{stage}/top1": results["top1"], f"{stage}/gflops": results["gflops"]}
            logger.log_hyperparams(_run_params(trainer, pl_module), metrics, step)  # beside the val/* point
            self._hparams_written = True
        writer.flush()


def _layout() -> dict:
    charts = {
        "tokens per layer": ["Multiline", [r"merge(_test)?/tokens_l\d+"]],
        "kept-token ratio per layer": ["Multiline", [r"merge(_test)?/kept_ratio_l\d+"]],
        "GFLOPs": ["Multiline", [r"merge(_test)?/gflops.*"]],
    }
    return {"merge": charts}


def _run_params(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """The settings that make one operating point, flat for TensorBoard's HParams table."""
    hparams = pl_module.hparams
    params: dict[str, Any] = {
        "model_name": hparams.get("model_name"),
        "weights": str(hparams.get("weights")),
        "pretrained": hparams.get("pretrained"),
    }
    params.update(
        {f"merger/{k}": str(v) if isinstance(v, list) else v for k, v in pl_module.merger.params().items()}
    )
    datamodule = trainer.datamodule
    if datamodule is not None:
        params["batch_size"] = getattr(datamodule, "batch_size", None)
        config = getattr(datamodule, "data_config", {})
        params["crop_pct"] = config.get("crop_pct")
        params["interpolation"] = config.get("interpolation")
    return params
