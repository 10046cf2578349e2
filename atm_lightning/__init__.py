"""atm-lightning: training-free token merging (ATM, ToMe, EViT) for timm Vision Transformers."""

from .merge import ATM, EViT, NoMerge, TokenMerger, ToMe
from .patch import MergeStats, UnsupportedModelError, merge_stats, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "ATM",
    "EViT",
    "MergeStats",
    "NoMerge",
    "ToMe",
    "TokenMerger",
    "UnsupportedModelError",
    "merge_stats",
    "patch",
    "unpatch",
]
