"""The tokens of a batch between two merge steps, and what each of them stands for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenState:
    """Tokens of a batch as the block loop carries them from step to step.

    Padded: image ``i`` holds its real tokens in its first ``protected + free[i]`` of ``W`` slots,
    the rest padding of size 0. Before any merge every image holds all ``N`` tokens of size 1
    (``size`` is None) and ``free`` is one int; after a merge that left every image with the same
    number of tokens (ToMe, EViT, ATM's ``min`` rule) it stays an int. The compiled CPU kernel
    (:mod:`.fused`) carries the real tokens packed instead, ``x`` [T, C], one image after the other.
    """

    x: Tensor  # [B, W, C] padded, or [T, C] packed (``real_rows`` set)
    free: Tensor | int  # [B] long tokens per image that may merge (all but the protected prefix), or one int for all
    protected: int  # prefix tokens (class, distillation, registers): never merged
    size: Tensor | None = None  # [B, W] patches each token stands for, 0 on padding; None: all 1
    positions: Tensor | None = None  # [B, W, 2] float32: mean grid (row, col) of its patches (RoPE models)
    source: Tensor | None = None  # [B, W, T0]: which input tokens each token holds (trace_source)
    real_rows: Tensor | None = None  # packed: the padded slot ``b * W + j`` of every packed row

    @classmethod
    def start(cls, x: Tensor, protected: int, trace_source: bool, positions: Tensor | None = None) -> TokenState:
        """The tokens entering the first block: ``x`` [B, N, C], each its own source."""
        batch, n, _ = x.shape
        source = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n) if trace_source else None
        return cls(x, n - protected, protected, positions=positions, source=source)

    @property
    def width(self) -> int:
        """W: slots per image (its tokens and its padding)."""
        return self.size.shape[1] if self.size is not None else self.x.shape[-2]

    @property
    def batch(self) -> int:
        return self.size.shape[0] if self.size is not None else self.x.shape[0]

    @property
    def padded_batch(self) -> bool:
        """Whether images hold different numbers of tokens (``free`` is per image)."""
        return isinstance(self.free, Tensor)

    def with_x(self, x: Tensor) -> TokenState:
        """The same tokens' new values (a block's residual); ``dataclasses.replace`` without its
        per-call introspection, which twice per block is a visible cost at batch 1."""
        return TokenState(x, self.free, self.protected, self.size, self.positions, self.source, self.real_rows)

    def sizes(self) -> Tensor:
        """[B, W] token sizes, ones before the first merge."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.batch, self.width)

    def counts(self) -> Tensor:
        """[B] long: real tokens per image."""
        if isinstance(self.free, Tensor):
            return self.free + self.protected
        return torch.full((self.batch,), self.free + self.protected, device=self.x.device, dtype=torch.long)

    def padded(self) -> Tensor:
        """The tokens padded, [B, W, C], padding zeroed."""
        if self.real_rows is None:
            return self.x
        padded = self.x.new_zeros(self.batch * self.width, self.x.shape[-1])
        return padded.index_copy_(0, self.real_rows, self.x).view(self.batch, self.width, -1)

    def images(self, rows: Tensor) -> TokenState:
        """The same tokens for the images ``rows`` ([K] long) only (padded states)."""
        if self.real_rows is not None:
            raise ValueError("select images of a padded state")
        free = self.free[rows] if isinstance(self.free, Tensor) else self.free
        return TokenState(
            self.x[rows],
            free,
            self.protected,
            None if self.size is None else self.size[rows],
            None if self.positions is None else self.positions[rows],
            None if self.source is None else self.source[rows],
        )
