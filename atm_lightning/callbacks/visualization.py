"""Pictures of merged token groups on a fixed set of validation images, in TensorBoard."""

from __future__ import annotations

import dataclasses
from typing import Any

import timm
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torchvision.utils import make_grid

from ..data.images import unnormalize
from ..patch import merge_stats, patch
from ..vis import paint_merged_groups
from ._tensorboard import logged_step, tensorboard_logger


class MergeVisualizationCallback(Callback):
    """Log the first validation images above the same images painted by merged group.

    The images are the first ``num_images`` of the validation set (fixed across epochs and runs, so
    pictures compare). After validation, rank 0 runs the model once more on them with the merger
    set to trace sources, then restores the original merger; results are unaffected.

    Args:
        num_images: how many validation images to show.
        every_n_epochs: log after every n-th validation epoch (``validate`` runs count as epoch 0).
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(
                f"num_images and every_n_epochs must be >= 1, got {num_images} and {every_n_epochs}"
            )
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self._images: Tensor | None = None

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        have = 0 if self._images is None else len(self._images)
        if not trainer.is_global_zero or dataloader_idx != 0 or have >= self.num_images:
            return
        new = batch[0][: self.num_images - have].detach().cpu()
        self._images = new if self._images is None else torch.cat([self._images, new])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = tensorboard_logger(trainer)
        due = trainer.current_epoch % self.every_n_epochs == 0
        if trainer.sanity_checking or not trainer.is_global_zero or logger is None or not due:
            return
        if self._images is None:
            return
        source = _trace_sources(pl_module, self._images)
        model = pl_module.model
        originals = unnormalize(self._images, _data_config(trainer, model))
        painted = paint_merged_groups(
            originals, source, model.patch_embed.patch_size[0], model.num_prefix_tokens
        )
        grid = make_grid(torch.cat([originals, painted]), nrow=len(originals), padding=2, pad_value=1.0)
        logger.experiment.add_image("merge/groups", grid, logged_step(trainer))
        logger.experiment.flush()


def _trace_sources(pl_module: LightningModule, images: Tensor) -> Tensor:
    """[B, N, T0] sources from one forward with source tracing on; the module is left as it was."""
    model = pl_module.model
    tracer = dataclasses.replace(pl_module.merger, trace_source=True)
    was_training = model.training
    model.eval()
    try:
        patch(model, tracer)
        with torch.inference_mode():
            model(images.to(pl_module.device))
        return merge_stats(model).source.float().cpu()
    finally:
        pl_module.restore_merging()
        model.train(was_training)


def _data_config(trainer: Trainer, model: torch.nn.Module) -> dict[str, Any]:
    """The normalisation actually applied: the DataModule's, else the model's timm default."""
    config = getattr(trainer.datamodule, "data_config", None)
    return config if config is not None else timm.data.resolve_model_data_config(model)

