"""Exponential moving average of the weights, evaluated and saved in place of the raw weights."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

Weights = dict[str, Tensor]


class EMA(Callback):
    """Keep ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step of ``fit``.

    Validation and test run with the EMA weights (so ``val/top1`` and the best checkpoint are the
    EMA's), and checkpoints store the EMA weights as the module's ``state_dict``: ``atm validate
    --model.weights ckpt`` evaluates exactly what was validated. The raw weights travel in this
    callback's checkpoint state, and resuming (``atm fit --ckpt_path``) with this callback puts
    them back into the model; resumed without it, training would go on from the EMA weights.
    The average lives in this callback, never in module buffers, so DDP has nothing extra to
    broadcast; every rank updates it identically from identical weights.

    Args:
        decay: weight of the old average per optimizer step; the average spans about
            ``1 / (1 - decay)`` steps (DeiT's code: 0.99996 for 300 epochs at batch 1024).
    """

    def __init__(self, decay: float = 0.9998) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.9998; got {decay}")
        self.decay = decay
        self.ema: Weights | None = None
        self._raw: Weights | None = None  # the training weights while the EMA ones are swapped in
        self._pending_raw: Weights | None = None  # raw weights read from a checkpoint, until fit starts
        self._last_step = -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if any(isinstance(cb, ModelCheckpoint) and cb.save_weights_only for cb in trainer.callbacks):
            raise ValueError(
                "EMA writes its weights into full checkpoints only; set save_weights_only: false on "
                "ModelCheckpoint or remove the EMA callback"
            )
        weights = _weights(pl_module)
        if self._pending_raw is not None:
            # Resuming: the module was loaded with the checkpoint's EMA weights; train on the raw ones.
            self.ema = _clone(weights)
            _copy_into(weights, self._pending_raw)
            self._pending_raw = None
        elif self.ema is None:
            self.ema = _clone(weights)
        else:
            self.ema = {name: value.to(weights[name].device) for name, value in self.ema.items()}
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step in this batch
        self._last_step = trainer.global_step
        for name, value in _weights(pl_module).items():
            average = self.ema[name]
            if average.is_floating_point():
                average.lerp_(value, 1.0 - self.decay)
            else:
                average.copy_(value)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    def raw_weights(self, pl_module: LightningModule) -> Weights:
        """The training weights, whether or not the EMA ones are swapped in right now."""
        return self._raw if self._raw is not None else _weights(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self.ema is None:
            return
        state = checkpoint["state_dict"]
        checkpoint["callbacks"][self.state_key]["raw"] = {
            name: value.detach().cpu().clone() for name, value in self.raw_weights(pl_module).items()
        }
        for name, value in self.ema.items():
            state[f"model.{name}"] = value.detach().cpu().clone()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # A checkpoint written without EMA holds raw weights only: the average then restarts from them.
        self._pending_raw = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("raw")

    def _swap_in(self, pl_module: LightningModule) -> None:
        if self.ema is None or self._raw is not None:
            return
        weights = _weights(pl_module)
        self._raw = _clone(weights)
        _copy_into(weights, self.ema)

    def _swap_out(self, pl_module: LightningModule) -> None:
        if self._raw is None:
            return
        _copy_into(_weights(pl_module), self._raw)
        self._raw = None


def _weights(pl_module: LightningModule) -> Weights:
    """The timm model's tensors (parameters and buffers), sharing storage with the model."""
    return pl_module.model.state_dict(keep_vars=False)


def _clone(weights: Weights) -> Weights:
    return {name: value.detach().clone() for name, value in weights.items()}


@torch.no_grad()
def _copy_into(target: Weights, source: Weights) -> None:
    for name, value in target.items():
        value.copy_(source[name])
