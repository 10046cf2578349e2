"""Token merging as pure tensor functions and policies (no timm in here)."""

from .costs import pair_weight
from .matching import Matches, Split, alternating_split, best_matches, key_features, size_split
from .merging import Plan, merge_error, plan
from .policies import ATM, MatchingPolicy, NoMerge, PruningPolicy, TokenMerger, ToMe
from .pruning import EViT, class_attention, keep_count
from .selection import MatchContext, above_threshold, batch_min, layer_threshold, threshold_schedule, top_r
from .specs import MERGERS, from_config, from_config_file, from_spec, make_merger, to_config, to_spec
from .step import LayerRecord, match_step, padding_mask, prune_step
from .tokens import TokenState

__all__ = [
    "ATM",
    "MERGERS",
    "EViT",
    "LayerRecord",
    "MatchContext",
    "Matches",
    "MatchingPolicy",
    "NoMerge",
    "Plan",
    "PruningPolicy",
    "Split",
    "ToMe",
    "TokenMerger",
    "TokenState",
    "above_threshold",
    "alternating_split",
    "batch_min",
    "best_matches",
    "class_attention",
    "from_config",
    "from_config_file",
    "from_spec",
    "keep_count",
    "key_features",
    "layer_threshold",
    "make_merger",
    "match_step",
    "merge_error",
    "padding_mask",
    "pair_weight",
    "plan",
    "prune_step",
    "size_split",
    "threshold_schedule",
    "to_config",
    "to_spec",
    "top_r",
]
