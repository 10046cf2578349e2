"""Where a run's files go: its folder and name, and files that never replace an earlier run's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from .failures import rank_label

# How run names (config names such as vit_t_atm, deit_t_tome_ft) spell each merger class.
METHOD_IN_NAME = {"ATM": "atm", "ToMe": "tome", "EViT": "evit", "NoMerge": "dense"}


def run_name(name: str, method: str) -> str:
    """``name`` with its one method word (atm, tome, evit, dense; any case) replaced by ``method``."""
    words = name.split("_")
    named = [i for i, word in enumerate(words) if word.lower() in METHOD_IN_NAME.values()]
    if len(named) != 1 or words[named[0]].lower() == method:
        return name
    words[named[0]] = method
    return "_".join(words)


def unused_path(path: Path) -> Path:
    """``path`` if nothing is there yet, else the first free ``stem_N.suffix`` (N = 1, 2, ...):
    a run without its own folder (``--trainer.logger false``) must not replace an earlier result."""
    number, candidate = 0, path
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
    return candidate


def check_new_file(path: Path, overwrite: bool, example: str, option: str = "--output", flag: str = "--overwrite true") -> None:
    """Refuse, before any work, an output that would replace a result or could not be written;
    ``example`` is a file name to suggest where ``path`` is a folder."""
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give a file name, e.g. {option} {path / example}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass {flag} to replace it, or choose another {option}")
    check_writable_folder(path.parent, option)


def check_writable_folder(folder: Path, option: str = "--output") -> None:
    """The folder, or the nearest existing folder above it, must be one this process can write to."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {existing} ({option} {folder}); choose another {option}")


def new_run_folder(trainer: Trainer) -> Path | None:
    """The outermost folder of the run's log directory that does not exist yet (it will be this
    run's), or None when there is none or this process is not the first rank."""
    if not trainer.loggers or trainer.log_dir is None or rank_label() not in (None, "0"):
        return None
    folder = Path(trainer.log_dir).absolute()
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


class DiscardUnusedRunFolder(Callback):
    """Remove the run's new log folder when the run fails before any batch ends.

    Lightning creates ``version_N`` before the data is even set up; without this, a mistake in
    the data or the settings would leave an empty folder and push the next run to ``version_N+1``.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_validation_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_test_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_predict_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.folder is not None and self.batches == 0 and trainer.is_global_zero:
            shutil.rmtree(self.folder, ignore_errors=True)


class SaveConfigAside(SaveConfigCallback):
    """Lightning's config saving, under a free name where the folder already holds one (a run
    without a logger writes into the working directory, where an earlier run's or the user's own
    ``config.yaml`` may be)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not self.already_saved and log_dir is not None and trainer.is_global_zero:
            self.config_filename = unused_path(Path(log_dir) / self.config_filename).name
        super().setup(trainer, pl_module, stage)
