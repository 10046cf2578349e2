"""Token merging as pure tensor functions and policies (no timm in here)."""

from .costs import effective_matches, pair_weight, per_head_keys
from .matching import Matches, Split, alternating_split, best_matches, size_sorted_split, with_trash_row
from .merging import Merged, merge_error, merge_tokens
from .policies import ATM, EViT, MatchingPolicy, NoMerge, PruningPolicy, TokenMerger, ToMe
from .pruning import class_attention, keep_count, prune_inattentive
from .selection import MatchContext, above_threshold, batch_min, layer_threshold, threshold_schedule, top_r
from .specs import MERGERS, from_config, from_config_file, from_spec, make_merger, to_config, to_spec

__all__ = [
    "ATM",
    "MERGERS",
    "EViT",
    "MatchContext",
    "Matches",
    "MatchingPolicy",
    "Merged",
    "NoMerge",
    "PruningPolicy",
    "Split",
    "ToMe",
    "TokenMerger",
    "above_threshold",
    "alternating_split",
    "batch_min",
    "best_matches",
    "class_attention",
    "effective_matches",
    "from_config",
    "from_config_file",
    "from_spec",
    "keep_count",
    "layer_threshold",
    "make_merger",
    "merge_error",
    "merge_tokens",
    "pair_weight",
    "per_head_keys",
    "prune_inattentive",
    "size_sorted_split",
    "threshold_schedule",
    "to_config",
    "to_spec",
    "top_r",
    "with_trash_row",
]
