"""The one place that knows timm's VisionTransformer, Block and Attention.

``apply(model, merger)`` swaps the model's class for a subclass whose ``forward_features`` runs
the blocks through :func:`.loop.run_blocks`, so tokens merge between each block's attention and
its MLP. Blocks and attention modules are timm's own and untouched: the head-averaged keys that
ToMe and ATM match on (and the class token's query EViT needs) are read by forward hooks on each
``attn.q_norm``/``attn.k_norm`` (the last ops timm applies to q and k), and proportional
attention is the additive ``attn_mask`` timm's Attention already forwards to
``scaled_dot_product_attention``. Packed ragged batches call the attention's own submodules
around :func:`.attention.grouped_attention` instead, so that only that call sees padding.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..flops import ViTCost
from ..merge import MatchingPolicy, PruningPolicy, TokenMerger, class_attention
from .attention import grouped_attention
from .compiled import CompiledVitBlocks, backend_of
from .loop import RAGGED_MODES, BlockAttention, KeyNeeds, Merging, run_blocks
from .ragged import RaggedLayout
from .state import TokenState

SUPPORTED_POOLS = ("token", "avg", "")


class UnsupportedModelError(TypeError):
    """The model is not a timm VisionTransformer this patch knows how to merge tokens in."""


class _QueryKeyTap:
    """Forward hooks on ``attn.q_norm``/``attn.k_norm`` of one block.

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


class VitBlocks:
    """Runs timm ``Block``s for the block loop: hooks the keys, and runs packed tokens as well."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.taps = [_QueryKeyTap() for _ in blocks]
        self.hooks = []
        for block, tap in zip(blocks, self.taps, strict=True):
            self.hooks.append(block.attn.q_norm.register_forward_hook(tap.on_query))
            self.hooks.append(block.attn.k_norm.register_forward_hook(tap.on_key))

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def attention_residual(
        self, layer: int, block: Block, state: TokenState, bias: Tensor | None, needs: KeyNeeds
    ) -> tuple[Tensor, BlockAttention]:
        tap = self.taps[layer]
        if state.layout is None:
            x = state.x + block.drop_path1(block.ls1(block.attn(block.norm1(state.x), attn_mask=bias)))
            query, keys = tap.take()
            cls = class_attention(query, keys, block.attn.scale, bias) if needs.class_attention else None
            return x, BlockAttention(keys, query, block.attn.scale, cls)
        x, keys, cls = packed_attention_residual(block, state.x, bias, state.layout, needs)
        tap.clear()  # the hooks saw the grouped keys too
        return x, BlockAttention(keys, None, block.attn.scale, cls)

    def mlp_residual(self, block: Block, x: Tensor) -> Tensor:
        return add_residual(x, block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))


def packed_attention_residual(
    block: Block, x: Tensor, bias: Tensor, layout: RaggedLayout, needs: KeyNeeds
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x + attn(norm1(x))`` for packed tokens ``x`` [T, C] (inference: no drop-path).

    Runs the pieces of timm's ``Attention`` (qkv, q/k norms, norm, gate, proj) around the
    grouped attention with the block's additive mask, which is what timm's fused path computes.
    Also returns the keys for matching and, if ``needs`` asks, the class token's attention.
    """
    attn = block.attn
    h = block.norm1(x)
    mixed, keys, cls = grouped_attention(
        attn.qkv(h), layout, bias, attn.num_heads, attn.scale, attn.q_norm, attn.k_norm,
        needs.per_head_keys, needs.class_attention,
    )
    mixed = attn.norm(mixed)
    if getattr(attn, "gate", None) is not None:
        mixed = mixed * attn.gate(h).sigmoid()
    return add_residual(x, block.ls1(attn.proj_drop(attn.proj(mixed)))), keys, cls


def add_residual(x: Tensor, update: Tensor) -> Tensor:
    """``x + update``, in place when no graph is recorded (saves an allocation per layer)."""
    return x + update if torch.is_grad_enabled() else x.add_(update)


class TokenMergingMixin:
    """Placed in front of the model's own class by :func:`apply`."""

    _merging: Merging

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token merging does not support attn_mask/is_causal; unpatch the model")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = run_blocks(self._merging, self.blocks, x, self.training)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """timm's pooling, except that average pooling weights each token by its size.

        The sizes are those of the forward that produced ``x``: timm's ``forward_head`` (and
        distilled DeiT's own) passes the features alone.
        """
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._merging.last.size if self._merging.last is not None else None
        if pool_type != "avg" or size is None:
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weights = size[:, start:, None].to(x.dtype)  # padding has weight 0
        return (x[:, start:] * weights).sum(1) / weights.sum(1)


_PATCHED_CLASSES: dict[type, type] = {}


def _merging_class(cls: type) -> type:
    """A subclass of the model's class with merging, made once per class (stable for pickling)."""
    if cls not in _PATCHED_CLASSES:
        name = f"Merging{cls.__name__}"
        patched = type(name, (TokenMergingMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = patched  # so pickle (ddp_spawn, torch.save) finds it by name
        _PATCHED_CLASSES[cls] = patched
    return _PATCHED_CLASSES[cls]


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the model and the reason, or return."""
    name = getattr(getattr(model, "pretrained_cfg", None), "get", lambda *_: None)("architecture")
    label = f"{type(model).__name__}" + (f" ({name})" if name else "")
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"cannot merge tokens in {label}: only timm VisionTransformer models are supported "
            f"(ViT, DeiT, distilled DeiT, DeiT-III, MAE, ViTs with registers or average pooling)"
        )
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise UnsupportedModelError(
                f"cannot merge tokens in {label}: block {i} is {type(block).__name__} with "
                f"{type(block.attn).__name__}; only timm's standard Block/Attention are supported"
            )
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(
            f"cannot merge tokens in {label}: global_pool={model.global_pool!r} is not supported "
            f"(use a class-token or average-pooled model)"
        )
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError(f"cannot merge tokens in {label}: dynamic_img_size is not supported")


def apply(
    model: nn.Module,
    merger: TokenMerger,
    record_merges: bool = False,
    ragged: str = "packed",
    compile: bool | str = False,
) -> nn.Module:
    """Patch ``model`` in place to merge tokens with ``merger``; re-patching replaces the merger.

    ``ragged`` chooses how images with different token counts run: ``packed`` runs norms, linear
    layers and the MLP on real tokens only and attention in groups of similar length, ``padded``
    runs every layer on the padded batch (for comparison). Training always runs padded.
    ``compile`` runs each block's attention and MLP residuals through ``torch.compile``
    (:mod:`.compiled`; a string names its backend); the merge step stays eager.
    """
    if ragged not in RAGGED_MODES:
        raise ValueError(f"ragged must be one of {RAGGED_MODES}, got {ragged!r}")
    patched = isinstance(model, TokenMergingMixin)
    if not patched:
        check_supported(model)
    merger.check(len(model.blocks))
    if getattr(model, "cls_token", None) is None:
        if isinstance(merger, PruningPolicy):
            raise UnsupportedModelError(
                f"{merger.name} prunes by class-token attention, but {type(model).__name__} has no class token"
            )
        if isinstance(merger, MatchingPolicy) and merger.needs_class_attention:
            raise UnsupportedModelError(
                f"{merger.name} weighs merges by the class token's attention (attention_power), but "
                f"{type(model).__name__} has no class token; set attention_power 0"
            )
    backend = backend_of(compile) if compile else None  # the runner's, None for eager
    if patched and getattr(model._merging.blocks, "backend", None) == backend:
        blocks, cost = model._merging.blocks, model._merging.cost
    else:
        if patched:
            model._merging.blocks.remove_hooks()
        blocks = VitBlocks(model.blocks) if backend is None else CompiledVitBlocks(backend)
        cost = ViTCost.from_model(model)
        if not patched:
            model.__class__ = _merging_class(type(model))
    model._merging = Merging(merger, blocks, cost, model.num_prefix_tokens, record_merges, ragged)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is timm's own class again, with no hooks."""
    if isinstance(model, TokenMergingMixin):
        model._merging.blocks.remove_hooks()
        model.__class__ = type(model).__bases__[1]
        del model._merging
    return model
