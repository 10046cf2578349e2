"""Merge policies: per layer, how to split tokens and which matched pairs to merge.

A policy is plain configuration plus two decisions; it knows nothing of timm. The same objects
are what ``patch(model, ...)`` builds from keywords and what LightningCLI configs instantiate
(``model.merger.class_path: atm_lightning.merge.ATM``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from .matching import Matches
from .pruning import check_keep_rate
from .selection import above_threshold, batch_min, layer_threshold, threshold_schedule, top_r

SplitKind = Literal["alternate", "size"]


class TokenMerger:
    """Base policy: merges nothing. Subclasses decide the split and the selection."""

    name: str = "none"
    prunes: bool = False  # True: the policy prunes by class attention (EViT) instead of matching

    def __init__(self, prop_attn: bool = True, trace_source: bool = False) -> None:
        """
        Args:
            prop_attn: add log(size) to attention logits (ToMe's proportional attention).
                Turn off for MAE-style checkpoints, as ToMe advises.
            trace_source: track which original patches each token holds (for visualisation).
        """
        self.prop_attn = prop_attn
        self.trace_source = trace_source

    @property
    def merges(self) -> bool:
        """False when the policy can never merge, so the model runs exactly as timm's."""
        return False

    def check(self, depth: int) -> None:
        """Raise ValueError naming the fix when the settings cannot apply to ``depth`` blocks."""

    def split_kind(self, layer: int) -> SplitKind:
        """Split used in block ``layer`` (0-indexed)."""
        return "alternate"

    def threshold(self, layer: int) -> float | None:
        """Similarity a pair must exceed in block ``layer`` (0-indexed), or None for fixed counts."""
        return None

    def select(self, layer: int, matches: Matches, num_unprotected: Tensor) -> Tensor:
        """Mask [B, Na] of sources that merge in block ``layer``.

        ``num_unprotected`` [B] counts each image's real tokens that may merge.
        """
        return matches.similarity.new_zeros(matches.similarity.shape, dtype=bool)

    def params(self) -> dict:
        """Settings as plain data, for result rows and logs."""
        return {"method": self.name, "prop_attn": self.prop_attn}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "method")
        return f"{type(self).__name__}({args})"


class NoMerge(TokenMerger):
    """The dense model: no token is ever merged."""


class ToMe(TokenMerger):
    """ToMe (Bolya et al. 2023): merge the ``r`` most similar source tokens in every block."""

    name = "tome"

    def __init__(
        self, r: int | list[int] = 8, prop_attn: bool = True, trace_source: bool = False
    ) -> None:
        """
        Args:
            r: merges per block, one int for every block or a list with one entry per block.
            prop_attn: proportional attention (on for off-the-shelf evaluation).
            trace_source: track which original patches each token holds.
        """
        super().__init__(prop_attn=prop_attn, trace_source=trace_source)
        self.r = list(r) if isinstance(r, Sequence) else r
        for value in self.r if isinstance(self.r, list) else [self.r]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ToMe r must be a non-negative integer (or a list of them), got {r!r}")

    @property
    def merges(self) -> bool:
        return any(v > 0 for v in self.r) if isinstance(self.r, list) else self.r > 0

    def check(self, depth: int) -> None:
        if isinstance(self.r, list) and len(self.r) != depth:
            raise ValueError(
                f"ToMe r has {len(self.r)} entries but the model has {depth} blocks; "
                f"give one entry per block or a single int"
            )

    def r_at(self, layer: int) -> int:
        return self.r[layer] if isinstance(self.r, list) else self.r

    def select(self, layer: int, matches: Matches, num_unprotected: Tensor) -> Tensor:
        # ToMe's cap: at most half of the unprotected tokens merge in one block.
        return top_r(matches.similarity, (num_unprotected // 2).clamp(max=self.r_at(layer)))

    def params(self) -> dict:
        return {"method": self.name, "r": self.r, "prop_attn": self.prop_attn}


class ATM(TokenMerger):
    """ATM (Lee & Choi 2025): layer-wise similarity thresholds, size-sorted split in late blocks."""

    name = "atm"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.02,
        theta_min: float = 0.86,
        split_layer: int = 10,
        batch_rule: Literal["exact", "min"] = "exact",
        prop_attn: bool = True,
        trace_source: bool = False,
    ) -> None:
        """
        Args:
            alpha: threshold of block 1; values >= 1 mean the first blocks merge nothing.
            beta: decay rate of the threshold over depth (>= 0).
            theta_min: floor of the threshold, in [-1, 1]; 1 or more disables merging (every
                threshold is then at least 1, which no cosine similarity exceeds), whatever alpha.
            split_layer: first block (1-indexed) whose A/B split is by token size;
                depth + 1 keeps the alternating split everywhere.
            batch_rule: ``exact`` merges each image's own above-threshold pairs (batch-size
                independent); ``min`` merges ``min_i c_i`` pairs in every image (the paper's reading).
            prop_attn: proportional attention.
            trace_source: track which original patches each token holds.
        """
        super().__init__(prop_attn=prop_attn, trace_source=trace_source)
        for key, value in {"alpha": alpha, "beta": beta, "theta_min": theta_min}.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"ATM {key} must be a finite number, got {value!r}")
        if beta < 0:
            raise ValueError(f"ATM beta must be >= 0 (the threshold decays with depth), got {beta}")
        if theta_min < -1:
            raise ValueError(
                f"ATM theta_min must be >= -1 (cosine similarity lies in [-1, 1]), got {theta_min}"
            )
        if alpha < theta_min < 1.0:
            raise ValueError(
                f"ATM alpha ({alpha}) must be >= theta_min ({theta_min}): alpha is the first block's "
                f"threshold and theta_min the floor it decays to (theta_min >= 1 disables merging)"
            )
        if not isinstance(split_layer, int) or isinstance(split_layer, bool) or split_layer < 1:
            raise ValueError(f"ATM split_layer is a 1-indexed block number >= 1, got {split_layer!r}")
        if batch_rule not in ("exact", "min"):
            raise ValueError(f"ATM batch_rule must be 'exact' or 'min', got {batch_rule!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.theta_min = float(theta_min)
        self.split_layer = split_layer
        self.batch_rule = batch_rule

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

    def select(self, layer: int, matches: Matches, num_unprotected: Tensor) -> Tensor:
        selected = above_threshold(matches.similarity, self.threshold(layer))
        if self.batch_rule == "min":
            selected = batch_min(selected, matches.similarity)
        return selected

    def params(self) -> dict:
        return {
            "method": self.name,
            "alpha": self.alpha,
            "beta": self.beta,
            "theta_min": self.theta_min,
            "split_layer": self.split_layer,
            "batch_rule": self.batch_rule,
            "prop_attn": self.prop_attn,
        }


class EViT(TokenMerger):
    """EViT (Liang et al. 2022): in chosen blocks keep the most class-attended tokens, fuse the rest."""

    name = "evit"
    prunes = True

    def __init__(
        self,
        keep_rate: float = 0.7,
        prune_layers: list[int] | None = None,
        fuse_token: bool = True,
        prop_attn: bool = False,
        trace_source: bool = False,
    ) -> None:
        """
        Args:
            keep_rate: fraction of unprotected tokens kept in each pruning block, in (0, 1].
            prune_layers: 1-indexed blocks that prune; default [4, 7, 10] as EViT does for
                12-block DeiT.
            fuse_token: fuse the pruned tokens into one attention-weighted token (else drop them).
            prop_attn: proportional attention by token size (EViT itself has none).
            trace_source: track which original patches each token holds.
        """
        super().__init__(prop_attn=prop_attn, trace_source=trace_source)
        check_keep_rate(keep_rate)
        layers = [4, 7, 10] if prune_layers is None else list(prune_layers)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in layers):
            raise ValueError(f"EViT prune_layers are 1-indexed block numbers >= 1, got {prune_layers!r}")
        self.keep_rate = float(keep_rate)
        self.prune_layers = sorted(set(layers))
        self.fuse_token = fuse_token

    @property
    def merges(self) -> bool:
        return self.keep_rate < 1.0 and bool(self.prune_layers)

    def check(self, depth: int) -> None:
        if self.prune_layers and self.prune_layers[-1] > depth:
            raise ValueError(
                f"EViT prune_layers {self.prune_layers} go past the model's {depth} blocks; use 1..{depth}"
            )

    def prunes_at(self, layer: int) -> bool:
        """Whether block ``layer`` (0-indexed) prunes."""
        return layer + 1 in self.prune_layers

    def params(self) -> dict:
        return {
            "method": self.name,
            "keep_rate": self.keep_rate,
            "prune_layers": self.prune_layers,
            "fuse_token": self.fuse_token,
            "prop_attn": self.prop_attn,
        }


MERGERS: dict[str, type[TokenMerger]] = {"none": NoMerge, "tome": ToMe, "atm": ATM, "evit": EViT}


def make_merger(method: str | TokenMerger, **kwargs) -> TokenMerger:
    """Build a policy from a method name and its keyword settings (or pass one through)."""
    if isinstance(method, TokenMerger):
        if kwargs:
            raise TypeError("pass settings either in the merger object or as keywords, not both")
        return method
    key = str(method).lower()
    if key not in MERGERS:
        raise ValueError(f"unknown merging method {method!r}; choose one of {sorted(MERGERS)}")
    cls = MERGERS[key]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"{key}: {err}. Valid settings: {_settings_of(cls)}") from None


def _settings_of(cls: type[TokenMerger]) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
