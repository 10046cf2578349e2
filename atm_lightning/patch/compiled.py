"""torch.compile for patched ViTs: the blocks' static parts compiled, the merge step eager.

What a block computes around the merge step has a fixed structure whatever the token count: the
attention residual of a padded batch; for packed tokens the norm and qkv projection before the
grouped attention and the output projection and residual after it; the MLP residual. Those run
as compiled functions with dynamic token and image counts, one compiled graph serving every block
(parameters are graph inputs), so a new batch never recompiles once each variant was seen (with
and without the attention bias, padded and packed tokens, one image or several). The merge step
and the grouped attention of packed ragged batches, whose shapes depend on the data, stay eager.

The padded attention is :func:`.vit.padded_attention_residual`, the eager runner's own, compiled:
it returns the keys itself, so neither runner registers hooks.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor

from ..merge import class_attention
from .attention import grouped_attention
from .loop import BlockAttention, KeyNeeds
from .state import TokenState
from .vit import padded_attention_residual, prefix_block


def packed_qkv(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """``norm1(x)`` and its qkv projection for packed tokens [T, C]: what precedes grouped attention."""
    h = block.norm1(x)
    return h, block.attn.qkv(h)


def packed_output(block: Block, x: Tensor, h: Tensor, mixed: Tensor) -> Tensor:
    """``x`` plus the attention output of packed tokens, from the grouped attention's ``mixed`` values."""
    attn = block.attn
    mixed = attn.norm(mixed)
    if getattr(attn, "gate", None) is not None:
        mixed = mixed * attn.gate(h).sigmoid()
    return x + block.ls1(attn.proj_drop(attn.proj(mixed)))


def mlp_residual(block: Block, x: Tensor) -> Tensor:
    """``x + mlp(norm2(x))`` for padded [B, N, C] or packed [T, C] tokens."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def backend_of(compile: bool | str) -> str:
    """The ``torch.compile`` backend a ``compile`` setting names (True: the default, inductor)."""
    return "inductor" if compile is True else str(compile)


class CompiledVitBlocks:
    """A :class:`~.loop.BlockRunner` for timm ``Block``s whose static parts run compiled.

    ``dynamic=True``: token and image counts vary from call to call and from block to block.
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.attention = torch.compile(padded_attention_residual, dynamic=True, backend=backend)
        self.mlp = torch.compile(mlp_residual, dynamic=True, backend=backend)
        self.packed_qkv = torch.compile(packed_qkv, dynamic=True, backend=backend)
        self.packed_output = torch.compile(packed_output, dynamic=True, backend=backend)

    def remove_hooks(self) -> None:
        """Nothing to remove: the compiled attention returns the keys itself."""

    def attention_residual(
        self, layer: int, block: Block, state: TokenState, bias: Tensor | None, needs: KeyNeeds
    ) -> tuple[Tensor, BlockAttention]:
        attn = block.attn
        if state.layout is None:
            x, query, keys = self.attention(block, state.x, bias)
            cls = class_attention(query, keys, attn.scale, bias) if needs.class_attention else None
            return x, BlockAttention(keys, query, attn.scale, cls)
        h, qkv = self.packed_qkv(block, state.x)
        mixed, keys, cls = grouped_attention(
            qkv, state.layout, bias, attn.num_heads, attn.scale, attn.q_norm, attn.k_norm,
            needs.per_head_keys, needs.class_attention,
        )  # fmt: skip
        return self.packed_output(block, state.x, h, mixed), BlockAttention(keys, None, attn.scale, cls)

    def mlp_residual(self, block: Block, x: Tensor) -> Tensor:
        return self.mlp(block, x)

    def prefix_block(self, layer: int, block: Block, x: Tensor, bias: Tensor | None, prefix: int) -> Tensor:
        return prefix_block(block, x, bias, prefix)  # one small block per batch: eager
