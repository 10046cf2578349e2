"""Token merging as pure tensor functions and policies (no timm in here)."""

from .matching import Matches, Split, alternating_split, best_matches, size_sorted_split
from .merging import Merged, merge_error, merge_tokens
from .policies import ATM, MERGERS, EViT, NoMerge, TokenMerger, ToMe, make_merger
from .pruning import class_attention, keep_count, prune_inattentive
from .selection import above_threshold, batch_min, layer_threshold, threshold_schedule, top_r

__all__ = [
    "ATM",
    "MERGERS",
    "EViT",
    "Matches",
    "Merged",
    "NoMerge",
    "Split",
    "ToMe",
    "TokenMerger",
    "above_threshold",
    "alternating_split",
    "batch_min",
    "best_matches",
    "class_attention",
    "keep_count",
    "layer_threshold",
    "make_merger",
    "merge_error",
    "merge_tokens",
    "prune_inattentive",
    "size_sorted_split",
    "threshold_schedule",
    "top_r",
]
