"""The one place that knows timm's VisionTransformer, Block and Attention.

``apply(model, merger)`` swaps the model's class for a subclass that runs the blocks itself, so
it can merge tokens between each block's attention and its MLP. Blocks and attention modules are
timm's own and untouched; the head-averaged keys that ToMe and ATM match on are read by a forward
hook on each ``attn.k_norm`` (the last op timm applies to the keys), and proportional attention is
the additive ``attn_mask`` timm's Attention already forwards to ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..flops import ViTCost
from ..merge import (
    Matches,
    Merged,
    Split,
    TokenMerger,
    alternating_split,
    best_matches,
    class_attention,
    keep_count,
    merge_tokens,
    prune_inattentive,
    size_sorted_split,
)
from ..merge.merging import with_trash_row

SUPPORTED_POOLS = ("token", "avg", "")


class UnsupportedModelError(TypeError):
    """The model is not a timm VisionTransformer this patch knows how to merge tokens in."""


@dataclass
class LayerRecord:
    """What one block's merge step decided, kept only with ``record_merges=True`` (tests, debugging)."""

    layer: int  # 0-indexed block
    split: str
    threshold: float | None
    similarity: Tensor  # [B, Na] best-match similarity per source slot (-inf: not real)
    selected: Tensor  # [B, Na] bool
    a_size: Tensor  # [B, Na] sizes of the source slots (0: not real)
    b_size: Tensor  # [B, Nb] sizes of the destination slots (0: not real)
    dst_size: Tensor  # [B, Na] size of each source's matched destination


@dataclass
class MergeTrace:
    """Record of the last forward pass of a patched model."""

    tokens: Tensor  # [B, depth+1] long: tokens entering each block, then after the last
    size: Tensor | None  # [B, N] final token sizes (None: nothing merged)
    source: Tensor | None  # [B, N, T0] final token sources (with trace_source)
    matching_macs: Tensor  # [B] cost of similarity computations
    layers: list[LayerRecord] = field(default_factory=list)
    sources: list[Tensor] = field(default_factory=list)  # source after each block (trace_source)


class _QueryKeyTap:
    """Forward hooks on ``attn.q_norm``/``attn.k_norm``: the last ops timm applies to q and k.

    Keeps this block's class-token query ([B, H, 1, d]; EViT needs no other) and per-head keys
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
        q, k, self.q, self.k = self.q, self.k, None, None
        if q is None or k is None:
            raise RuntimeError("attention queries/keys were not captured; was the block's attention replaced?")
        return q, k


def _attention_bias(size: Tensor | None, prop_attn: bool, dtype: torch.dtype) -> Tensor | None:
    """Additive attention mask: log(size) (proportional attention) or 0, and -inf on padding."""
    if size is None:
        return None
    if prop_attn:
        bias = size.to(dtype).log()
    else:
        bias = torch.zeros_like(size, dtype=dtype).masked_fill(size == 0, float("-inf"))
    return bias[:, None, None, :]


class TokenMergingMixin:
    """Mixin placed in front of the model's own class by :func:`apply`."""

    _merger: TokenMerger
    _merge_cost: ViTCost
    _merge_taps: list[_QueryKeyTap]
    _merge_record: bool
    _merge_ragged: str
    _merge_trace: MergeTrace | None

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token merging does not support attn_mask/is_causal; unpatch the model")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self._merging_blocks(x)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._merge_trace.size if self._merge_trace is not None else None
        if pool_type != "avg" or size is None:
            return super().pool(x, pool_type)
        # Size-weighted mean: each token stands for ``size`` patches, padding has weight 0.
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weights = size[:, start:, None].to(x.dtype)
        return (x[:, start:] * weights).sum(1) / weights.sum(1)

    def _merging_blocks(self, x: Tensor) -> Tensor:
        merger = self._merger
        batch, n, _ = x.shape
        count = torch.full((batch,), n, device=x.device, dtype=torch.long)
        size: Tensor | None = None
        source = None
        if merger.trace_source:
            source = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n)
        tokens = [count]
        matching = torch.zeros(batch, device=x.device, dtype=torch.float64)
        records: list[LayerRecord] = []
        sources: list[Tensor] = []

        for layer, block in enumerate(self.blocks):
            bias = _attention_bias(size, merger.prop_attn, x.dtype)
            x, q, k = self._attention_residual(block, self._merge_taps[layer], x, bias, count)
            if merger.merges:
                weights = size if size is not None else x.new_ones(batch, x.shape[1])
                if merger.prunes:
                    merged, cost = self._prune_step(layer, block, x, weights, source, q, k, bias, count)
                else:
                    merged, cost = self._merge_step(layer, x, weights, source, k, count, records)
                matching += cost
                if merged is not None:
                    x, size, source, count = merged.x, merged.size, merged.source, merged.count
            x = self._mlp_residual(block, x, size, count)
            tokens.append(count)
            if source is not None:
                sources.append(source)

        self._merge_trace = MergeTrace(torch.stack(tokens, dim=1), size, source, matching, records, sources)
        return x


    def _merge_step(
        self,
        layer: int,
        x: Tensor,
        weights: Tensor,
        source: Tensor | None,
        k: Tensor,
        count: Tensor,
        records: list[LayerRecord],
    ) -> tuple[Merged | None, Tensor]:
        """ToMe/ATM: bipartite matching on head-averaged keys, then the policy's selection."""
        merger, protected = self._merger, self.num_prefix_tokens
        if merger.split_kind(layer) == "size":
            split = size_sorted_split(weights, protected)
        else:
            split = alternating_split(weights > 0, protected)
        matches = best_matches(with_trash_row(k.mean(dim=1)), split)
        selected = merger.select(layer, matches, count - protected)
        cost = self._merge_cost.matching_macs(split.a_ok.sum(1), split.b_ok.sum(1))
        if self._merge_record:
            records.append(_record(layer, merger, split, matches, selected, weights))
        if not bool(selected.any()):
            return None, cost
        return merge_tokens(x, weights, source, split, matches, selected, protected), cost

    def _prune_step(
        self,
        layer: int,
        block: Block,
        x: Tensor,
        weights: Tensor,
        source: Tensor | None,
        q: Tensor,
        k: Tensor,
        bias: Tensor | None,
        count: Tensor,
    ) -> tuple[Merged | None, Tensor]:
        """EViT: keep the tokens the class token attends to most, fuse the rest."""
        merger, protected = self._merger, self.num_prefix_tokens
        if not merger.prunes_at(layer):
            return None, torch.zeros_like(count, dtype=torch.float64)
        attention = class_attention(q, k, block.attn.scale, bias)
        cost = (count * block.attn.num_heads * block.attn.head_dim).double()  # q_cls . k for every token
        keep = keep_count(merger.keep_rate, count - protected)
        if not bool((keep < count - protected).any()):
            return None, cost
        return prune_inattentive(x, weights, source, attention, keep, protected, merger.fuse_token), cost

    def _attention_residual(
        self, block: Block, tap: _QueryKeyTap, x: Tensor, bias: Tensor | None, count: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x + attn(norm1(x))``, the class-token query [B, H, 1, d] and per-head keys [B, H, N, d].

        With ragged images, padding would cost attention its full length, so images are sorted
        by token count and run in a few groups, each cut to its own longest image.
        """
        groups = self._length_groups(count, x.shape[1]) if bias is not None else None
        if groups is None:
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))
            return (x, *tap.take())
        out = x.clone()
        heads, head_dim = block.attn.num_heads, block.attn.head_dim
        q = x.new_zeros(x.shape[0], heads, 1, head_dim)
        k = x.new_zeros(x.shape[0], heads, x.shape[1], head_dim)
        for rows, length in groups:
            part = x[rows, :length]
            out[rows, :length] = part + block.ls1(block.attn(block.norm1(part), attn_mask=bias[rows, ..., :length]))
            q[rows], k[rows, :, :length] = tap.take()
        return out, q, k

    def _length_groups(self, count: Tensor, width: int) -> list[tuple[Tensor, int]] | None:
        """Up to 4 groups of images with similar token counts, or None when grouping saves little."""
        if self._merge_ragged == "padded" or self.training or count.numel() < 4:
            return None
        lengths, order = count.sort(descending=True)
        lengths_host = lengths.tolist()
        if sum(lengths_host) >= 0.95 * width * len(lengths_host):
            return None
        num_groups = 4 if len(lengths_host) >= 16 else 2
        bounds = [round(i * len(lengths_host) / num_groups) for i in range(num_groups + 1)]
        return [(order[a:b], lengths_host[a]) for a, b in itertools.pairwise(bounds) if b > a]

    def _mlp_residual(self, block: Block, x: Tensor, size: Tensor | None, count: Tensor) -> Tensor:
        """``x + mlp(norm2(x))``; with ragged images, on the real tokens only (packed).

        The MLP is two thirds of a block's FLOPs and treats tokens independently, so padding
        tokens are skipped by gathering the real ones into one [T, C] matrix and adding the
        result back. Training keeps the padded path: drop-path needs the batch dimension.
        """
        if size is None or self._merge_ragged == "padded" or self.training or bool((count == x.shape[1]).all()):
            return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        flat = x.reshape(-1, x.shape[-1])
        real = (size.reshape(-1) > 0).nonzero().squeeze(1)
        packed = flat.index_select(0, real)
        return flat.index_add(0, real, block.ls2(block.mlp(block.norm2(packed)))).view_as(x)


def _record(
    layer: int, merger: TokenMerger, split: Split, matches: Matches, selected: Tensor, weights: Tensor
) -> LayerRecord:
    sizes = with_trash_row(weights)
    dst_pos = split.b_idx.gather(1, matches.dst)
    return LayerRecord(
        layer=layer,
        split=merger.split_kind(layer),
        threshold=merger.threshold(layer),
        similarity=matches.similarity.detach(),
        selected=(selected & split.a_ok).detach(),
        a_size=sizes.gather(1, split.a_idx) * split.a_ok,
        b_size=sizes.gather(1, split.b_idx) * split.b_ok,
        dst_size=sizes.gather(1, dst_pos) * split.a_ok,
    )


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


def _check_policy_fits(model: nn.Module, merger: TokenMerger) -> None:
    merger.check(len(model.blocks))
    if merger.prunes and getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError(
            f"{merger.name} prunes by class-token attention, but {type(model).__name__} has no class token"
        )


RAGGED_MODES = ("packed", "padded")


def apply(
    model: nn.Module, merger: TokenMerger, record_merges: bool = False, ragged: str = "packed"
) -> nn.Module:
    """Patch ``model`` in place to merge tokens with ``merger``; re-patching replaces the merger.

    ``ragged`` chooses how images with different token counts run: ``packed`` runs the MLP on
    real tokens only and attention in groups of similar length, ``padded`` runs every layer on
    the padded batch (for comparison). Training always runs padded.
    """
    if ragged not in RAGGED_MODES:
        raise ValueError(f"ragged must be one of {RAGGED_MODES}, got {ragged!r}")
    if not isinstance(model, TokenMergingMixin):
        check_supported(model)
    _check_policy_fits(model, merger)
    if not isinstance(model, TokenMergingMixin):
        taps = []
        handles = []
        for block in model.blocks:
            tap = _QueryKeyTap()
            handles.append(block.attn.q_norm.register_forward_hook(tap.on_query))
            handles.append(block.attn.k_norm.register_forward_hook(tap.on_key))
            taps.append(tap)
        model._merge_taps = taps
        model._merge_hooks = handles
        model._merge_cost = ViTCost.from_model(model)
        model.__class__ = _merging_class(type(model))
    model._merger = merger
    model._merge_record = record_merges
    model._merge_ragged = ragged
    model._merge_trace = None
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is timm's own class again, with no hooks."""
    if isinstance(model, TokenMergingMixin):
        for handle in model._merge_hooks:
            handle.remove()
        model.__class__ = type(model).__bases__[1]
        for attr in (
            "_merger",
            "_merge_taps",
            "_merge_hooks",
            "_merge_cost",
            "_merge_record",
            "_merge_ragged",
            "_merge_trace",
        ):
            delattr(model, attr)
    return model
