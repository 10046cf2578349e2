"""Analytic FLOPs of a ViT from the token counts each image actually had in each block.

Convention of the token-reduction literature (DeiT, ToMe, EViT, ATM): one multiply-add counts as
one FLOP, and only linear layers and the two attention matmuls are counted. For a block of width
D, attention width A (= D for ViTs), MLP hidden H, with N tokens entering and N' leaving the merge:

    qkv  N*D*3A      attention  2*N^2*A      proj  N*A*D      MLP  2*N'*D*H

(the qkv term sums whatever linear layers the attention has besides its output projection: fused
qkv, separate q/k/v, a gate; the MLP term sums the MLP's linear layers, so SwiGLU counts its three),
plus the patch embedding (patches * 3*P*P * D), an attention-pooling head's work on the final
tokens if the model has one, and the classifier head (D * classes). Patches are those of the
image as it came in (``N`` entering the first block minus the prefix tokens), so models at any
resolution, or with ``dynamic_img_size``, are counted at their real grid. Merging happens after
attention, so attention is paid at N and the MLP at N'. Rotary position embeddings are
element-wise and, like norms and activations, not counted. Padding never counts: callers pass
each image's real counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTCost:
    """Per-token multiply-adds of one ViT, read off its layers once."""

    depth: int
    qkv_per_token: int  # D * 3A
    attn_width: int  # A: QK^T and AV cost N^2 * A each
    proj_per_token: int  # A * D
    mlp_per_token: int  # 2 * D * H (sum over the MLP's linear layers)
    head_dim: int  # width of the keys used for matching
    patch_embed: int  # patch embedding of one patch
    num_prefix: int  # class, distillation and register tokens (no patch embedding)
    head: int  # classifier(s), and the attention-pooling head's work that does not depend on N
    pool_per_token: int = 0  # attention pooling: keys/values and scores of each pooled final token
    pool_skips: int = 0  # prefix tokens the attention pooling leaves out

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTCost:
        """Read the cost from a timm-style ViT (``patch_embed.proj``, ``blocks[i].attn/mlp``, ``head``,
        optionally ``attn_pool``): timm's VisionTransformer and Eva."""
        attn = model.blocks[0].attn
        conv = model.patch_embed.proj
        kh, kw = conv.kernel_size
        heads = [m for name in ("head", "head_dist") if isinstance(m := getattr(model, name, None), nn.Linear)]
        pool_fixed, pool_per_token = _attention_pool_macs(getattr(model, "attn_pool", None))
        return cls(
            depth=len(model.blocks),
            qkv_per_token=_linear_macs(attn, skip=attn.proj),
            attn_width=attn.num_heads * attn.head_dim,
            proj_per_token=attn.proj.in_features * attn.proj.out_features,
            mlp_per_token=_linear_macs(model.blocks[0].mlp),
            head_dim=attn.head_dim,
            patch_embed=conv.in_channels * kh * kw * conv.out_channels,
            num_prefix=model.num_prefix_tokens,
            head=sum(h.in_features * h.out_features for h in heads) + pool_fixed,
            pool_per_token=pool_per_token,
            pool_skips=0 if getattr(model, "pool_include_prefix", True) else model.num_prefix_tokens,
        )

    def block_macs(self, n_in: Tensor, n_out: Tensor) -> Tensor:
        """Multiply-adds of one block with ``n_in`` tokens at attention and ``n_out`` at the MLP."""
        n_in = n_in.double()
        attention = n_in * (self.qkv_per_token + self.proj_per_token) + 2 * n_in**2 * self.attn_width
        return attention + n_out.double() * self.mlp_per_token

    def prefix_block_macs(self, n_in: Tensor, prefix: int) -> Tensor:
        """Multiply-adds of a block that computes only its ``prefix`` first tokens from ``n_in``:
        keys and values of every token, queries, attention, projection and MLP of the prefix."""
        n_in = n_in.double()
        query = self.qkv_per_token // 3  # fused qkv: three equal parts
        per_prefix = query + self.proj_per_token + self.mlp_per_token
        return n_in * (self.qkv_per_token - query) + 2 * prefix * n_in * self.attn_width + prefix * per_prefix

    def image_macs(self, tokens: Tensor, prefix_only: int = 0) -> Tensor:
        """Multiply-adds per image from ``tokens`` [B, depth+1] (tokens entering each block, then out);
        ``prefix_only`` > 0: the last block computed only that many prefix tokens."""
        if tokens.shape[-1] != self.depth + 1:
            raise ValueError(f"tokens must have depth+1={self.depth + 1} columns, got {tokens.shape[-1]}")
        if prefix_only:
            blocks = self.block_macs(tokens[..., :-2], tokens[..., 1:-1]).sum(-1)
            blocks = blocks + self.prefix_block_macs(tokens[..., -2], prefix_only)
        else:
            blocks = self.block_macs(tokens[..., :-1], tokens[..., 1:]).sum(-1)
        patches = (tokens[..., 0] - self.num_prefix).double()
        pooled = (tokens[..., -1] - self.pool_skips).double()
        return blocks + patches * self.patch_embed + pooled * self.pool_per_token + self.head

    def dense_macs(self, num_tokens: int, prefix_only: int = 0) -> float:
        """Multiply-adds of the unmerged model with ``num_tokens`` tokens in every block (the last
        computing only ``prefix_only`` prefix tokens, if > 0)."""
        tokens = torch.full((1, self.depth + 1), num_tokens, dtype=torch.long)
        return float(self.image_macs(tokens, prefix_only)[0])

    def resumed_macs(self, num_tokens: int, layer: int | None, prefix_only: int = 0) -> float:
        """Multiply-adds of an unmerged rerun that picks up after block ``layer``'s attention (the
        tokens up to there are the merged pass's): that block's MLP, the later blocks and the head.
        ``layer`` None: the whole dense forward."""
        full = self.dense_macs(num_tokens, prefix_only)
        if layer is None:
            return full
        merging_blocks = self.depth - (1 if prefix_only else 0)  # a prefix-only last block never merges
        if not 0 <= layer < merging_blocks:
            raise ValueError(f"a rerun resumes inside a block that merges, 0..{merging_blocks - 1}; got {layer}")
        n = torch.tensor(num_tokens)
        done = float(self.block_macs(n, n)) * layer + float(self.block_macs(n, torch.tensor(0)))  # + that attention
        return full - done - (num_tokens - self.num_prefix) * self.patch_embed

    def matching_macs(self, num_a: Tensor | int, num_b: Tensor | int, width: int | None = None) -> Tensor | float:
        """Cost of the cosine similarities of one matching step: |A| * |B| * the width of the
        compared keys (head_dim for head-averaged keys, the attention width for per-head ones).
        Tensors of counts give a float64 tensor; ints give the same value as a float."""
        width = self.head_dim if width is None else width
        if isinstance(num_a, Tensor):
            return num_a.double() * num_b.double() * width
        return float(num_a) * float(num_b) * width

    def class_attention_macs(self, num_tokens: Tensor | int) -> Tensor | float:
        """Cost of the class token's attention to every token, read by pruning and attention
        weighting apart from the model's own (fused) attention: N * attention width."""
        if isinstance(num_tokens, Tensor):
            return num_tokens.double() * self.attn_width
        return float(num_tokens) * self.attn_width


def _linear_macs(module: nn.Module, skip: nn.Module | None = None) -> int:
    """Multiply-adds per token of the linear layers in ``module`` (but ``skip``)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear) and m is not skip)


def _attention_pool_macs(pool: nn.Module | None) -> tuple[int, int]:
    """timm's ``AttentionPoolLatent``: (work independent of the tokens: the latent queries, the
    output projection and MLP; work per pooled token: its keys/values and two score products)."""
    if pool is None:
        return 0, 0
    latents, width = pool.latent_len, pool.kv.out_features // 2
    return latents * _linear_macs(pool, skip=pool.kv), pool.kv.in_features * pool.kv.out_features + 2 * latents * width


def to_gflops(macs: Tensor | float) -> Tensor | float:
    """Multiply-adds to the papers' "GFLOPs"."""
    return macs / 1e9
