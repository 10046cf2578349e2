"""The Trainer the ``atm`` command runs: Lightning's, with ``calibrate`` and a ``predict`` that
writes one row per image."""

from __future__ import annotations

from typing import Any

import torch

from .calibration import CalibrationTrainer
from .prediction import PredictionWriter


class ATMTrainer(CalibrationTrainer):
    """:class:`.CalibrationTrainer` whose ``predict`` writes each image's prediction to a file."""

    def predict(
        self,
        model: Any = None,
        dataloaders: Any = None,
        datamodule: Any = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        output: str | None = None,
        overwrite: bool = False,
    ) -> Any:
        """Predict every image of data.predict_split once and write a row per image: its top-5
        classes and probabilities, the unmerged model's top-1 beside them (with model.fidelity),
        the tokens it ended with, its GFLOPs and whether it ran again unmerged.

        Args:
            output: the file to write, ``.csv`` or ``.jsonl``; default: ``predictions.csv`` in the
                run's log folder (with ``--trainer.logger false``: the working directory, under a
                free name).
            overwrite: replace ``output`` if it exists (otherwise an existing file is an error).
        """
        writer = PredictionWriter(output, overwrite=overwrite)
        self.callbacks.append(writer)
        try:
            loading = {} if weights_only is None else {"weights_only": weights_only}  # Lightning >= 2.5 has it
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, **loading)
        finally:
            self.callbacks.remove(writer)


def fit_precision(accelerator: Any) -> str:
    """The precision ``atm fit`` trains in where none is given: bf16 autocast on GPUs that have
    it, fp16 autocast on older ones, 32-bit on the CPU (CPU autocast is slow without bf16
    hardware, and the fine-tuning configs must run on whatever machine they are given)."""
    name = accelerator if isinstance(accelerator, str) else "other"
    gpu = name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())
    if not gpu or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def check_accelerator(accelerator: Any) -> None:
    """Lightning's own error for a GPU that is not there names neither the option nor the fix."""
    gpu_here = torch.cuda.is_available() or torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not gpu_here:
        raise ValueError(
            f"--trainer.accelerator {accelerator}, but torch finds no GPU on this machine; pass "
            f"--trainer.accelerator auto (which takes the CPU here) or cpu"
        )
