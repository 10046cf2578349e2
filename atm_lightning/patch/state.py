"""The tokens between two steps of the block loop, and what each of them stands for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..merge import Merged
from .ragged import RaggedLayout, ragged_layout


@dataclass(frozen=True)
class TokenState:
    """Tokens of a batch as the block loop carries them from step to step.

    Before any merge every image has ``N`` tokens of size 1 (``size`` is None). After merges the
    images keep different numbers of tokens: padded to the longest (padding has size 0), or, in
    packed runs, sorted by token count (``image_order``) with their real tokens packed into one
    matrix (``layout`` says where they are). Everything a caller sees is put back in input order.
    """

    x: Tensor  # [B, W, C] padded, or [T, C]: the real tokens packed (``layout`` is set)
    count: Tensor  # [B] long: real tokens per image
    size: Tensor | None = None  # [B, W]: patches each token stands for, 0 on padding
    source: Tensor | None = None  # [B, W, T0]: which input tokens each token holds (trace_source)
    image_order: Tensor | None = None  # [B]: row i holds input image image_order[i]
    layout: RaggedLayout | None = None  # where the real tokens are while ``x`` is packed
    coords: Tensor | None = None  # [B, W, 2] float32: sum of the grid (row, col) of the patches each holds

    @classmethod
    def start(cls, x: Tensor, trace_source: bool, coords: Tensor | None = None) -> TokenState:
        """The tokens entering the first block: ``x`` [B, N, C], each its own source; ``coords``
        [B, N, 2], where the model needs token positions (RoPE), each token's grid position."""
        batch, n, _ = x.shape
        count = torch.full((batch,), n, device=x.device, dtype=torch.long)
        source = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n) if trace_source else None
        return cls(x, count, source=source, coords=coords)

    def with_x(self, x: Tensor) -> TokenState:
        """The same tokens' new values ``x`` (a block's residual): ``dataclasses.replace`` without
        its per-call introspection, which twice per block is a visible cost at batch 1."""
        return TokenState(x, self.count, self.size, self.source, self.image_order, self.layout, self.coords)

    def carried(self) -> Tensor | None:
        """What a merge step adds up over merged tokens besides sizes: the source (if traced) and
        the coordinate sums (if kept), side by side in one [B, W, K] tensor (see :meth:`after`)."""
        if self.coords is None:
            return self.source
        if self.source is None:
            return self.coords
        return torch.cat([self.source.to(self.coords.dtype), self.coords], dim=-1)

    def positions(self) -> Tensor:
        """[B, W, 2] each token's position: the size-weighted mean grid (row, col) of its patches."""
        return self.coords / self.sizes()[..., None].to(self.coords.dtype).clamp_min(1)

    def sizes(self) -> Tensor:
        """[B, W] token sizes, ones before the first merge."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1])

    def after(self, merged: Merged, attention_width: int) -> TokenState:
        """The state a merge step left: its tokens, with packing and image order kept track of.

        ``attention_width`` sets how dear padded attention is when grouping images of a packed
        batch (see :func:`.ragged.ragged_layout`).
        """
        image_order = self.image_order
        if merged.image_order is not None:
            image_order = merged.image_order if image_order is None else image_order[merged.image_order]
        source, coords = merged.source, None
        if self.coords is not None:
            coords = source[..., -2:]
            source = None if self.source is None else source[..., :-2].to(self.source.dtype)
        x, layout = merged.x, None
        if x.dim() == 2:  # packed by the merge step
            layout = ragged_layout(merged.count, merged.size.shape[1], attention_width)
            if layout is None:  # no padding left: the packed rows are the padded batch
                x = x.view(len(merged.count), merged.size.shape[1], -1)
        return TokenState(x, merged.count, merged.size, source, image_order, layout, coords)

    def in_input_order(self, value: Tensor | None) -> Tensor | None:
        """``value`` (rows follow this state's images) with its rows back in the input order."""
        if value is None or self.image_order is None:
            return value
        return torch.empty_like(value).index_copy_(0, self.image_order, value)

    def padded(self) -> Tensor:
        """The tokens padded, [B, W, C] in this state's image order, padding zeroed."""
        x = self.x
        if self.layout is not None:
            batch, width = self.size.shape
            padded = x.new_zeros(batch * width, x.shape[-1])
            x = padded.index_copy_(0, self.layout.real_rows, x).view(batch, width, -1)
        return x

    def features(self) -> Tensor:
        """The tokens padded, [B, W, C] in input order, padding zeroed."""
        return self.in_input_order(self.padded())
