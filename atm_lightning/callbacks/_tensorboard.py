"""Finding the TensorBoard writer among a trainer's loggers, and the step to write at."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_logger(trainer: Trainer) -> TensorBoardLogger | None:
    """The first TensorBoard logger, or None: these callbacks write only what TensorBoard can show."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def stage_of(trainer: Trainer) -> str:
    """``val`` or ``test``: the key of ``TokenMergingModule.results`` being produced."""
    return "test" if trainer.testing else "val"


def logged_step(trainer: Trainer) -> int:
    """The step Lightning logs an evaluation's ``val/*`` metrics at (its optimizer steps so far,
    counted as its logger connector counts them), so that what these callbacks write about the
    same evaluation lands on the same step; the global step where a loop keeps no such count."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
