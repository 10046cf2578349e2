"""Merge policies: frozen settings plus the decisions the block loop asks of them (no timm in here).

There are two kinds, and the loop dispatches on the type:

- a :class:`MatchingPolicy` (ToMe, ATM) splits each block's tokens into sources and destinations,
  lets every source find its most similar destination, then chooses which sources merge;
- a :class:`PruningPolicy` (EViT, in :mod:`.pruning`) keeps the tokens the class token attends to most.

:class:`NoMerge` is neither: the model runs as timm's, with token and FLOPs accounting.

Policies are frozen dataclasses: change one with ``dataclasses.replace(policy, trace_source=True)``.
The same objects are what ``patch(model, "atm", ...)`` builds from keywords and what LightningCLI
configs instantiate (``model.merger.class_path: atm_lightning.merge.ATM``); :mod:`.specs` maps
them to and from config entries and ``tome:r=8`` strings.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from torch import Tensor

from .costs import pair_weight
from .matching import Split
from .selection import MatchContext, above_threshold, batch_min, layer_threshold, threshold_schedule, top_r

SplitKind = Literal["alternate", "size"]
KeyForm = Literal["mean", "per_head"]
_SHARED = ("prop_attn", "rerun_margin", "last_block_prefix_only", "trace_source")  # settings every policy has


@dataclass(frozen=True, kw_only=True)
class TokenMerger(ABC):
    """What every policy has. Abstract, which also makes jsonargparse read configs of it as
    ``class_path``/``init_args`` (a tree of dataclasses alone would be read as one nested group).

    Args:
        prop_attn: add log(size) to the attention logits (ToMe's proportional attention). Turn it
            off for MAE-style checkpoints and for fine-tuning, as ToMe advises.
        rerun_margin: at inference, run again unmerged every image whose merged prediction is
            uncertain: the gap between its two largest softmax probabilities is below this (0: off,
            the papers' methods). Their outputs become the dense model's; the second pass picks
            up where the batch first merged and counts in the FLOPs. ``atm calibrate
            --rerun_fraction`` sets it from the calibration images.
        last_block_prefix_only: at inference, the last block computes only the prefix tokens
            (class, distillation, registers), all that a class-token head reads: the same logits
            for most of that block's cost. Needs a timm VisionTransformer with class-token pooling.
        trace_source: track which original patches each token holds (for pictures).
    """

    name: ClassVar[str]
    prop_attn: bool = True
    rerun_margin: float = 0.0
    last_block_prefix_only: bool = False
    trace_source: bool = False

    def __post_init__(self) -> None:
        for setting in fields(self):  # a string such as "false" would otherwise count as true
            if setting.type == "bool" and not isinstance(value := getattr(self, setting.name), bool):
                raise ValueError(f"{self.name} {setting.name} is true or false, got {value!r}")
        margin = self.rerun_margin
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0.0 <= margin <= 1.0:
            raise ValueError(
                f"rerun_margin is a softmax-probability gap in [0, 1] (0: off; atm calibrate --rerun_fraction "
                f"sets it), got {margin!r}"
            )
        object.__setattr__(self, "rerun_margin", float(margin))

    @property
    @abstractmethod
    def merges(self) -> bool:
        """False when the policy can never merge, so the model runs exactly as timm's."""

    def merges_in(self, layer: int) -> bool:
        """False when block ``layer`` (0-indexed) can merge nothing, whatever the tokens: the block
        loop then skips the step there, with the similarities and attention rows it would read."""
        return self.merges

    def check(self, depth: int) -> None:
        """Raise ValueError naming the fix when the settings cannot apply to ``depth`` blocks."""

    @classmethod
    def settings(cls) -> list[str]:
        """Names of the settings, the policy's own first (as its docs list them), shared ones last."""
        names = {f.name for f in fields(cls)}
        declared = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {})]
        own = [name for name in dict.fromkeys(declared) if name in names and name not in _SHARED]
        return own + list(_SHARED)

    def params(self) -> dict[str, Any]:
        """Settings as plain data (lists, not tuples), for result rows, logs and configs.

        ``trace_source`` is left out: it changes what is recorded, not what is computed.
        """
        values = {name: getattr(self, name) for name in self.settings() if name != "trace_source"}
        plain = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
        return {"method": self.name, **plain}


@dataclass(frozen=True, kw_only=True)
class NoMerge(TokenMerger):
    """The dense model: no token is ever merged (token and FLOPs accounting still run)."""

    name: ClassVar[str] = "none"

    @property
    def merges(self) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class MatchingPolicy(TokenMerger):
    """Bipartite matching on attention keys: per block a split, then which matched sources merge."""

    def split_kind(self, layer: int) -> SplitKind:
        """Split used in block ``layer`` (0-indexed): alternating positions, or by token size."""
        return "alternate"

    def threshold(self, layer: int) -> float | None:
        """Similarity a pair must exceed in block ``layer`` (0-indexed), or None for fixed counts."""
        return None

    @property
    def key_form(self) -> KeyForm:
        """Keys matched on: ``mean`` (averaged over heads, as ToMe) or ``per_head`` (each head's own)."""
        return "mean"

    @property
    def needs_class_attention(self) -> bool:
        """Whether :meth:`score` reads the class token's attention (the block loop computes it then)."""
        return False

    @property
    def keeps_norm(self) -> bool:
        """Whether merged tokens keep the mean length of their parts (see :func:`.merging.mean_tokens`)."""
        return False

    def pair_weight(
        self, split: Split, size: Tensor, attention: Tensor | None, num_unprotected: Tensor | int
    ) -> Tensor | None:
        """[B, Na, Nb] factor on each pair's dissimilarity (:mod:`.costs`); None: plain cosine."""
        return None

    @abstractmethod
    def select(self, context: MatchContext) -> tuple[Tensor, int | None]:
        """Mask [B, Na] of the sources that merge into their best match in this block, and how many
        every image merges when that is one count the host knows (None otherwise). Rows that are
        not real sources may be chosen: their size is 0, so they move nothing."""


@dataclass(frozen=True, kw_only=True)
class PruningPolicy(TokenMerger):
    """Keep the tokens the class token attends to most in some blocks (needs a class token).

    Args:
        fuse_token: fuse the pruned tokens into one attention-weighted token (else drop them).
    """

    prop_attn: bool = False
    fuse_token: bool = True

    @abstractmethod
    def keep(self, layer: int, num_unprotected: int) -> int | None:
        """Tokens each image keeps of its ``num_unprotected`` in block ``layer`` (0-indexed); None
        where it does not prune."""


def integers_at_least(values: Sequence[Any], least: int) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values)


@dataclass(frozen=True, kw_only=True)
class ToMe(MatchingPolicy):
    """ToMe (Bolya et al. 2023): merge the ``r`` most similar source tokens in every block.

    Args:
        r: merges per block, one int for every block or a list with one entry per block.
    """

    name: ClassVar[str] = "tome"
    r: int | tuple[int, ...] = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, Sequence):
            object.__setattr__(self, "r", tuple(self.r))
        if not integers_at_least(self.r if isinstance(self.r, tuple) else [self.r], 0):
            raise ValueError(f"ToMe r must be a non-negative integer (or a list of them), got {self.r!r}")

    @property
    def merges(self) -> bool:
        return any(v > 0 for v in self.r) if isinstance(self.r, tuple) else self.r > 0

    def check(self, depth: int) -> None:
        if isinstance(self.r, tuple) and len(self.r) != depth:
            raise ValueError(
                f"ToMe r has {len(self.r)} entries but the model has {depth} blocks; "
                f"give one entry per block or a single int"
            )

    def r_at(self, layer: int) -> int:
        return self.r[layer] if isinstance(self.r, tuple) else self.r

    def merges_in(self, layer: int) -> bool:
        return self.r_at(layer) > 0

    def select(self, context: MatchContext) -> tuple[Tensor, int | None]:
        # ToMe's cap: at most half of the unprotected tokens merge in one block.
        unprotected = context.free
        if isinstance(unprotected, int):  # every image holds all its slots: the same count for all
            limit = min(unprotected // 2, self.r_at(context.layer), context.split.num_rows)
            return top_r(context.matches.score, limit), limit
        score = context.matches.score.masked_fill(~context.real_rows(), float("-inf"))
        return top_r(score, (unprotected // 2).clamp(max=self.r_at(context.layer))), None


@dataclass(frozen=True, kw_only=True)
class ATM(MatchingPolicy):
    """ATM (Lee & Choi 2025): layer-wise similarity thresholds, size-sorted split in late blocks.

    Args:
        alpha: threshold of block 1; values >= 1 mean the first blocks merge nothing.
        beta: decay rate of the threshold over depth (>= 0).
        theta_min: floor of the threshold, in [-1, 1]; 1 or more disables merging (every threshold
            is then at least 1, which no cosine similarity exceeds), whatever alpha.
        split_layer: first block (1-indexed) whose A/B split is by token size; depth + 1 keeps the
            alternating split everywhere.
        batch_rule: ``exact`` merges each image's own above-threshold pairs (batch-size
            independent); ``min`` merges ``min_i c_i`` pairs in every image (the paper's reading).
        keys: ``mean`` matches on the cosine similarity of head-averaged keys (the paper);
            ``per_head`` on the mean of the heads' own cosine similarities.
        size_weighted: compare pairs by their merge error (Theorem 1: ``1 - cos`` times
            ``2 n_a n_b / (n_a + n_b)``) instead of plain cosine, so large tokens merge less readily.
        attention_power: weight each pair's dissimilarity by the class token's attention to it,
            raised to this power (0: off, the paper); tokens the class token ignores merge more
            readily. Needs a class token.
        keep_norm: merged tokens keep the size-weighted mean length of their parts.
    """

    name: ClassVar[str] = "atm"
    alpha: float = 1.0
    beta: float = 0.02
    theta_min: float = 0.86
    split_layer: int = 10
    batch_rule: Literal["exact", "min"] = "exact"
    keys: KeyForm = "mean"
    size_weighted: bool = False
    attention_power: float = 0.0
    keep_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("alpha", "beta", "theta_min"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"ATM {key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.beta < 0:
            raise ValueError(f"ATM beta must be >= 0 (the threshold decays with depth), got {self.beta}")
        if self.theta_min < -1:
            raise ValueError(
                f"ATM theta_min must be >= -1 (cosine similarity lies in [-1, 1]), got {self.theta_min}"
            )
        if self.alpha < self.theta_min < 1.0:
            raise ValueError(
                f"ATM alpha ({self.alpha}) must be >= theta_min ({self.theta_min}): alpha is the first "
                f"block's threshold and theta_min the floor it decays to (theta_min >= 1 disables merging)"
            )
        if not integers_at_least([self.split_layer], 1):
            raise ValueError(f"ATM split_layer is a 1-indexed block number >= 1, got {self.split_layer!r}")
        if self.keys not in ("mean", "per_head"):
            raise ValueError(f"ATM keys must be 'mean' or 'per_head', got {self.keys!r}")
        power = self.attention_power
        if not isinstance(power, (int, float)) or isinstance(power, bool) or not 0 <= power <= 4:
            raise ValueError(f"ATM attention_power must be a number in [0, 4] (0: off; 0.5 works well), got {power!r}")
        object.__setattr__(self, "attention_power", float(power))
        if self.batch_rule not in ("exact", "min"):
            raise ValueError(f"ATM batch_rule must be 'exact' or 'min', got {self.batch_rule!r}")

    @property
    def merges(self) -> bool:
        # Thresholds never drop below theta_min, and stay at alpha when beta is 0.
        return self.theta_min < 1.0 and (self.alpha < 1.0 or self.beta > 0)

    def check(self, depth: int) -> None:
        if self.split_layer > depth + 1:
            raise ValueError(
                f"ATM split_layer={self.split_layer} is past the model's {depth} blocks; "
                f"use 1..{depth}, or {depth + 1} to keep the alternating split everywhere"
            )

    def thresholds(self, depth: int) -> list[float]:
        return threshold_schedule(self.alpha, self.beta, self.theta_min, depth)

    def split_kind(self, layer: int) -> SplitKind:
        return "size" if layer + 1 >= self.split_layer else "alternate"

    def threshold(self, layer: int) -> float:
        return layer_threshold(self.alpha, self.beta, self.theta_min, layer + 1)

    def merges_in(self, layer: int) -> bool:
        # A threshold of 1 or more merges nothing (see ``merges``): e.g. the first block at alpha 1.
        return self.threshold(layer) < 1.0

    @property
    def key_form(self) -> KeyForm:
        return self.keys

    @property
    def needs_class_attention(self) -> bool:
        return self.attention_power > 0

    @property
    def keeps_norm(self) -> bool:
        return self.keep_norm

    def pair_weight(
        self, split: Split, size: Tensor, attention: Tensor | None, num_unprotected: Tensor | int
    ) -> Tensor | None:
        return pair_weight(split, size, self.size_weighted, attention, self.attention_power, num_unprotected)

    def select(self, context: MatchContext) -> tuple[Tensor, int | None]:
        matches = context.matches
        selected = above_threshold(matches.score, self.threshold(context.layer) + matches.offset)
        if self.batch_rule == "exact":
            return selected, None
        real = context.real_rows()
        score = matches.score if real is None else matches.score.masked_fill(~real, float("-inf"))
        return batch_min(selected if real is None else selected & real, score), None
