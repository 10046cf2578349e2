"""The one place that knows timm's Eva (EVA-02, timm's RoPE ViTs, DINOv3) and its blocks.

Like :mod:`.vit`: the model's class gets a mixin whose ``forward_features`` runs timm's own
blocks through :func:`.loop.run_blocks`, and proportional attention is the additive ``attn_mask``
the attention forwards to SDPA. Unlike it, padded blocks run timm's own attention forward (which
applies RoPE inside), and the keys ToMe and ATM match on are read by hooks on each
``attn.k_norm`` (before RoPE: keys compare content; positions are averaged, not matched).

RoPE needs a position for every token. Each token carries the mean grid (row, col) of the
patches it holds (``TokenState.positions``: merges average them, weighted by size, like the
tokens themselves), and its rotation is timm's rotary embedding at that continuous position
(:mod:`.rope`). Attention is always timm's own (SDPA), whatever the ``attention`` setting. Until the first merge the model's own RoPE table is used, so an
unmerged forward is timm's bit for bit. Prefix tokens (class, registers) are never rotated.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers.attention import AttentionRope
from timm.models.eva import EvaAttention, EvaBlock
from torch import Tensor, nn

from ..merge import TokenState, class_attention
from .errors import UnsupportedModelError
from .loop import BlockAttention, KeyNeeds, Merging, run_blocks
from .pooling import pool_merged
from .model_api import MergingModel
from .rope import grid_coords, rope_at, rope_problem, rotate
from .vit import add_residual, check_pool

EVA_POOLS = ("token", "avg", "", "map")


class _QueryKeyTap:
    """Forward hooks on ``attn.q_norm``/``attn.k_norm`` of one Eva block.

    Keeps the class token's query ([B, H, 1, d]; EViT needs no other) and the per-head keys
    ([B, H, N, d]) until taken.
    """

    def __init__(self) -> None:
        self.q: Tensor | None = None
        self.k: Tensor | None = None

    def on_query(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.q = output[:, :, :1]

    def on_key(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.k = output

    def take(self) -> tuple[Tensor, Tensor]:
        q, k = self.q, self.k
        self.clear()
        if q is None or k is None:
            raise RuntimeError("attention queries/keys were not captured; was the block's attention replaced?")
        return q, k

    def clear(self) -> None:
        self.q = self.k = None


class EvaBlocks:
    """Runs timm ``EvaBlock``s for the block loop, with each token's rotation from its position."""

    def __init__(self, model: nn.Module) -> None:
        self.rope_module = model.rope
        self.num_prefix = model.num_prefix_tokens
        self.taps = [_QueryKeyTap() for _ in model.blocks]
        self.hooks = []
        for block, tap in zip(model.blocks, self.taps, strict=True):
            self.hooks.append(block.attn.q_norm.register_forward_hook(tap.on_query))
            self.hooks.append(block.attn.k_norm.register_forward_hook(tap.on_key))
        self.table: Tensor | None = None  # the model's RoPE table for this forward's grid
        self.grid: tuple[int, int] = (0, 0)
        self._rope: tuple[Tensor, Tensor] | None = None  # (positions, their per-token rope) of the last state

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def begin(self, table: Tensor | None, grid: tuple[int, int]) -> None:
        """The RoPE table and patch grid of the forward about to run."""
        self.table, self.grid, self._rope = table, grid, None

    def token_rope(self, tokens: TokenState) -> Tensor:
        """[B, W, 2d] each token's rotation (identity on prefix tokens), recomputed after merges only."""
        if self._rope is None or self._rope[0] is not tokens.positions:
            rope = rope_at(self.rope_module, tokens.positions, self.grid)
            half = rope.shape[-1] // 2
            rope[:, : self.num_prefix, :half] = 0  # sin 0, cos 1: no rotation
            rope[:, : self.num_prefix, half:] = 1
            self._rope = (tokens.positions, rope)
        return self._rope[1]

    def attention_residual(
        self, layer: int, block: EvaBlock, tokens: TokenState, bias: Tensor | None, needs: KeyNeeds, kernel: str
    ) -> BlockAttention:
        tap, attn = self.taps[layer], block.attn
        rope = None
        if self.rope_module is not None:
            rope = self.table if tokens.size is None else self.token_rope(tokens)
        timm_rope = rope if rope is None or rope.dim() == 2 else rope[:, None, self.num_prefix :]
        update = attn(block.norm1(tokens.x), rope=timm_rope, attn_mask=bias)
        if block.gamma_1 is not None:
            update = block.gamma_1 * update
        x = tokens.x + block.drop_path1(update)
        query, keys = tap.take()
        cls = None
        if needs.class_attention:
            rotated = keys
            if rope is not None:
                full = rope if rope.dim() == 3 else self._expand_table(rope, keys)
                rotated = rotate(keys, full[:, None], attn.rotate_half)
            cls = class_attention(query, rotated, attn.scale, bias)
        return BlockAttention(x, keys, cls)

    def _expand_table(self, table: Tensor, like: Tensor) -> Tensor:
        """The model's [N - prefix, 2d] table as [B, N, 2d] with identity rows for prefix tokens."""
        half = table.shape[-1] // 2
        identity = torch.cat([table.new_zeros(self.num_prefix, half), table.new_ones(self.num_prefix, half)], -1)
        return torch.cat([identity, table]).expand(like.shape[0], -1, -1)

    def mlp_residual(self, block: EvaBlock, x: Tensor) -> Tensor:
        update = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            update = block.gamma_2 * update
        return add_residual(x, block.drop_path2(update))

    def prefix_block(self, layer: int, block: EvaBlock, x: Tensor, bias: Tensor | None, prefix: int) -> Tensor:
        raise UnsupportedModelError("last_block_prefix_only is not supported on Eva models")  # refused at patch


class EvaMergingMixin(MergingModel):
    """Placed in front of an Eva model's own class by :func:`.adapters.apply`."""

    _merging: Merging

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token merging does not support attn_mask/is_causal; unpatch the model")
        self.check_training_options()
        if self.training and getattr(self.rope, "aug_active", False):
            raise NotImplementedError("token merging does not support RoPE coordinate augmentation")
        if self._merging.start is not None:  # a rerun: the blocks pick up where the merged pass first merged
            return self.norm(run_blocks(self._merging, self.blocks, None, self.training))
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, table = self._pos_embed(x)
        x = self.norm_pre(x)
        positions = None
        if self.rope is not None:
            positions = grid_coords(x.shape[0], grid, self.num_prefix_tokens, x.device)
        self._merging.blocks.begin(table, grid)
        x = run_blocks(self._merging, self.blocks, x, self.training, positions)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """timm's pooling, except that average and attention pooling count each token as many
        patches as it holds (:mod:`.pooling`); Eva's attention pooling sees every token."""
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._merging.last.size if self._merging.last is not None else None
        if size is None or (pool_type in ("token", "") and self.attn_pool is None):
            return super().pool(x, pool_type)
        return pool_merged(self, x, pool_type, size, 0 if self.attn_pool is not None else self.num_prefix_tokens)


def check_eva(model: nn.Module, label: str) -> None:
    """Raise :class:`UnsupportedModelError` for Eva variants the adapter cannot run."""
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not EvaBlock or type(attn) not in (EvaAttention, AttentionRope):
            raise UnsupportedModelError(
                f"cannot merge tokens in {label}: block {i} is {type(block).__name__} with "
                f"{type(attn).__name__}; only timm's pre-norm EvaBlock with EvaAttention/AttentionRope is supported"
            )
        if getattr(attn, "num_kv_groups", 1) != 1:
            raise UnsupportedModelError(f"cannot merge tokens in {label}: grouped-query attention is not supported")
    problem = rope_problem(model.rope) or ("per-block mixed RoPE" if model.rope_mixed else None)
    if problem:
        raise UnsupportedModelError(f"cannot merge tokens in {label}: its rotary embedding {problem} is not supported")
    if model.attn_pool is None and model.global_pool not in EVA_POOLS:
        raise UnsupportedModelError(
            f"cannot merge tokens in {label}: global_pool={model.global_pool!r} is not supported "
            f"(use a class-token, average or attention-pooled model)"
        )
    check_pool(model, label)
