"""Callbacks that show what merging did: per-layer token statistics and pictures of merged groups."""

from .ema import EMA
from .merge_stats import MergeStatsCallback
from .visualization import MergeVisualizationCallback

__all__ = ["EMA", "MergeStatsCallback", "MergeVisualizationCallback"]
