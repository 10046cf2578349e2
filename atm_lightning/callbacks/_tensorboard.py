"""Finding the TensorBoard writer among a trainer's loggers."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_logger(trainer: Trainer) -> TensorBoardLogger | None:
    """The first TensorBoard logger, or None: these callbacks write only what TensorBoard can show."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def stage_of(trainer: Trainer) -> str:
    """``val`` or ``test``: the key of ``TokenMergingModule.results`` being produced."""
    return "test" if trainer.testing else "val"
