"""Calibrating ATM for a model without training: ``search`` (pure), ``run`` (the model on training
images), ``command`` (the ``atm calibrate`` subcommand, writing a config)."""

from .command import CalibrationTrainer
from .run import calibrate
from .search import Calibration, Point, Shape, candidate_shapes, search, solve_level

__all__ = ["Calibration", "CalibrationTrainer", "Point", "Shape", "calibrate", "candidate_shapes", "search", "solve_level"]
