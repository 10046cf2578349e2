"""atm-lightning: training-free token merging (ATM, ToMe) for timm Vision Transformers."""

from .merge import ATM, NoMerge, ToMe, TokenMerger
from .patch import MergeStats, UnsupportedModelError, merge_stats, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "ATM",
    "MergeStats",
    "NoMerge",
    "ToMe",
    "TokenMerger",
    "UnsupportedModelError",
    "merge_stats",
    "patch",
    "unpatch",
]
