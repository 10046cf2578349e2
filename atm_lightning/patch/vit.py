"""The one place that knows timm's VisionTransformer, Block and Attention.

:func:`.adapters.apply` swaps the model's class for a subclass whose ``forward_features`` runs
the blocks through :func:`.loop.run_blocks`, so tokens merge between each block's attention and
its MLP. Blocks and attention modules are timm's own and untouched; the block loop calls their
submodules (norm, qkv, q/k norms, norm, gate, proj, layer scale, drop-path) in the order timm's
fused ``Attention`` does, so that it also has the per-head keys ToMe and ATM match on and the
class token's query EViT needs, without forward hooks (which cost a visible share of a
single-image forward). Proportional attention and padding are one additive mask to the
attention (:mod:`.attention`), as timm passes ``attn_mask``. Where the forward merges in the
compiled CPU kernel, packed tokens run the same pieces around the kernel's attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..merge import TokenState, class_attention
from ..merge.fused import fused_packed_attention
from .attention import attend
from .errors import UnsupportedModelError
from .loop import BlockAttention, KeyNeeds, Merging, run_blocks
from .pooling import pool_merged
from .model_api import MergingModel

SUPPORTED_POOLS = ("token", "avg", "")


class VitBlocks:
    """Runs timm ``Block``s for the block loop: padded tokens, or packed ones in the kernel's forwards."""

    def remove_hooks(self) -> None:
        """Nothing to remove: the attention returns the keys itself."""

    def attention_residual(
        self, layer: int, block: Block, tokens: TokenState, bias: Tensor | None, needs: KeyNeeds, kernel: str
    ) -> BlockAttention:
        if tokens.real_rows is not None:
            return packed_attention_residual(block, tokens, bias, needs)
        x, query, keys = padded_attention_residual(block, tokens.x, bias, kernel)
        scale = block.attn.scale
        cls = class_attention(query, keys, scale, bias) if needs.class_attention and not needs.kernel else None
        return BlockAttention(x, keys, cls, query, scale)

    def mlp_residual(self, block: Block, x: Tensor) -> Tensor:
        return add_residual(x, block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))

    def prefix_block(self, layer: int, block: Block, x: Tensor, bias: Tensor | None, prefix: int) -> Tensor:
        return prefix_block(block, x, bias, prefix)


def padded_attention_residual(
    block: Block, x: Tensor, bias: Tensor | None, kernel: str = "sdpa"
) -> tuple[Tensor, Tensor, Tensor]:
    """``x + attn(norm1(x))`` for padded tokens [B, N, C], as timm's fused Attention computes it
    (the same ops and arguments, so unmerged blocks give timm's output bit for bit; timm's
    unfused fallback, ``TIMM_FUSED_ATTN=0``, rounds differently), with the class token's query
    [B, H, 1, d] and the per-head keys [B, H, N, d]."""
    attn = block.attn
    batch, n, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attend(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0, kernel)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    return x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out)))), q[:, :, :1], k


def prefix_block(block: Block, x: Tensor, bias: Tensor | None, prefix: int) -> Tensor:
    """timm's ``Block`` (inference) for the ``prefix`` first tokens of padded ``x`` [B, W, C] only.

    Keys and values come from every token, queries from the prefix alone (the first third of the
    fused qkv weight), so attention, projection and MLP run on ``prefix`` rows: [B, prefix, C].
    """
    attn = block.attn
    batch, width, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h = block.norm1(x)
    weight, bias_qkv = attn.qkv.weight, attn.qkv.bias
    q_width = heads * head_dim
    q_bias, kv_bias = (None, None) if bias_qkv is None else (bias_qkv[:q_width], bias_qkv[q_width:])
    q = F.linear(h[:, :prefix], weight[:q_width], q_bias).view(batch, prefix, heads, head_dim).transpose(1, 2)
    kv = F.linear(h, weight[q_width:], kv_bias).view(batch, width, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(kv[0])
    out = F.scaled_dot_product_attention(q, k, kv[1], attn_mask=bias, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(batch, prefix, q_width))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h[:, :prefix]).sigmoid()
    tokens = x[:, :prefix] + block.ls1(attn.proj(out))
    return tokens + block.ls2(block.mlp(block.norm2(tokens)))


def packed_attention_residual(block: Block, tokens: TokenState, bias: Tensor, needs: KeyNeeds) -> BlockAttention:
    """``x + attn(norm1(x))`` for the packed tokens of the kernel's forwards (inference), attended
    in the kernel, with the keys it matches on and, if asked, the class token's attention."""
    attn = block.attn
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise UnsupportedModelError("the fused merge step needs attention without q/k norms: patch with fused=False")
    x, count = tokens.x, tokens.counts()
    h = block.norm1(x)
    mixed, keys, cls = fused_packed_attention(
        attn.qkv(h), count, bias, attn.num_heads, attn.scale, needs.per_head, needs.class_attention
    )
    mixed = attn.norm(mixed)
    if getattr(attn, "gate", None) is not None:
        mixed = mixed * attn.gate(h).sigmoid()
    return BlockAttention(add_residual(x, block.ls1(attn.proj_drop(attn.proj(mixed)))), keys, cls)


def add_residual(x: Tensor, update: Tensor) -> Tensor:
    """``x + update``, in place when no graph is recorded (saves an allocation per layer)."""
    return x + update if torch.is_grad_enabled() else x.add_(update)


class VitMergingMixin(MergingModel):
    """Placed in front of a VisionTransformer's own class by :func:`.adapters.apply`."""

    _merging: Merging

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token merging does not support attn_mask/is_causal; unpatch the model")
        self.check_training_options()
        if self._merging.start is not None:  # a rerun: the blocks pick up where the merged pass first merged
            return self.norm(run_blocks(self._merging, self.blocks, None, self.training))
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = run_blocks(self._merging, self.blocks, x, self.training)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """timm's pooling, except that average and attention pooling count each token as many
        patches as it holds (:mod:`.pooling`).

        The sizes are those of the forward that produced ``x``: timm's ``forward_head`` (and
        distilled DeiT's own) passes the features alone.
        """
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._merging.last.size if self._merging.last is not None else None
        if size is None or (pool_type in ("token", "") and self.attn_pool is None):
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        return pool_merged(self, x, pool_type, size, start)


def check_vit(model: VisionTransformer, label: str) -> None:
    """Raise :class:`UnsupportedModelError` for VisionTransformer variants the adapter cannot run."""
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not Block or type(attn) is not Attention:
            raise UnsupportedModelError(
                f"cannot merge tokens in {label}: block {i} is {type(block).__name__} with "
                f"{type(attn).__name__}; only timm's standard Block/Attention are supported"
            )
    check_pool(model, label)


def reads_prefix_only(model: nn.Module) -> bool:
    """Whether ``model`` is a timm VisionTransformer whose head reads the prefix tokens alone."""
    pooled = getattr(model, "attn_pool", None) is None and getattr(model, "global_pool", None) == "token"
    return isinstance(model, VisionTransformer) and pooled


def check_prefix_only(model: nn.Module, label: str) -> None:
    """``last_block_prefix_only`` is exact only where the head reads the prefix tokens alone."""
    if not reads_prefix_only(model):
        raise UnsupportedModelError(
            f"last_block_prefix_only needs a timm VisionTransformer whose head reads the class token "
            f"(global_pool='token'); {label} is not one: set last_block_prefix_only false"
        )


def check_pool(model: nn.Module, label: str) -> None:
    """Class-token, average or attention (``map``) pooling; a ``map`` head with its own position
    embedding (fixed token count) cannot pool merged tokens."""
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (not isinstance(pool, AttentionPoolLatent) or pool.pos_embed is not None):
        raise UnsupportedModelError(
            f"cannot merge tokens in {label}: its attention pooling {type(pool).__name__} needs a fixed token count"
        )
    if pool is None and model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(
            f"cannot merge tokens in {label}: global_pool={model.global_pool!r} is not supported "
            f"(use a class-token, average or attention-pooled model)"
        )
