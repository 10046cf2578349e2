"""The one place that knows timm's VisionTransformer, Block and Attention.

``apply(model, merger)`` swaps the model's class for a subclass that runs the blocks itself, so
it can merge tokens between each block's attention and its MLP. Blocks and attention modules are
timm's own and untouched; the head-averaged keys that ToMe and ATM match on are read by a forward
hook on each ``attn.k_norm`` (the last op timm applies to the keys), and proportional attention is
the additive ``attn_mask`` timm's Attention already forwards to ``scaled_dot_product_attention``.
Packed ragged batches (inference) call the attention's own submodules around a grouped attention
call instead, so that only that call sees padding (see :mod:`.ragged`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..flops import ViTCost
from ..merge import (
    MatchContext,
    Merged,
    PruningPolicy,
    TokenMerger,
    alternating_split,
    best_matches,
    class_attention,
    merge_tokens,
    prune_inattentive,
    size_sorted_split,
)
from .ragged import RaggedLayout, ragged_layout

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
        # Packed (inference only: drop-path needs the batch as it is): images stay sorted by
        # token count; token-wise layers run on the real tokens only and attention on a few
        # groups of similar length (see .ragged). ``image_order[i]`` is the input image in row i.
        packed = self._merge_ragged == "packed" and not self.training
        image_order: Tensor | None = None
        count = torch.full((batch,), n, device=x.device, dtype=torch.long)
        size: Tensor | None = None
        source = None
        if merger.trace_source:
            source = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n)
        tokens = [count]
        matching = torch.zeros(batch, device=x.device, dtype=torch.float64)
        records: list[LayerRecord] = []
        sources: list[Tensor] = []

        layout: RaggedLayout | None = None  # set while x is packed: [T, C], real tokens only
        for layer, block in enumerate(self.blocks):
            bias = _attention_bias(size, merger.prop_attn, x.dtype)
            tap = self._merge_taps[layer]
            if layout is None:
                x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))
                q, k = tap.take()
            else:  # only merge steps pack (pruning keeps equal counts), so no query is needed
                x, k = _packed_attention_residual(block, tap, x, bias, layout)
                q = None
            if merger.merges:
                weights = size if size is not None else x.new_ones(batch, x.shape[1])
                if isinstance(merger, PruningPolicy):
                    merged, cost = self._prune_step(layer, block, x, weights, source, q, k, bias, count)
                else:
                    merged, cost, record = self._merge_step(layer, x, weights, source, k, count, packed)
                    if record is not None:
                        records.append(_in_input_order(record, image_order))
                matching += _in_input_order(cost, image_order)
                if merged is not None:
                    x, size, source, count = merged.x, merged.size, merged.source, merged.count
                    if merged.image_order is not None:
                        image_order = merged.image_order if image_order is None else image_order[merged.image_order]
                    if x.dim() == 2:  # packed by the merge step
                        layout = ragged_layout(count, size.shape[1], block.attn.attn_dim)
                        if layout is None:  # no padding left: packed rows are the padded batch
                            x = x.view(batch, size.shape[1], -1)
            # Token-wise, so the same on the padded batch or the packed real tokens.
            x = _add_residual(x, block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))
            tokens.append(_in_input_order(count, image_order))
            if source is not None:
                sources.append(_in_input_order(source, image_order))

        if layout is not None:
            padded = x.new_zeros(batch * size.shape[1], x.shape[-1])
            x = padded.index_copy_(0, layout.real_rows, x).view(batch, size.shape[1], -1)
        x, size, source = (_in_input_order(t, image_order) for t in (x, size, source))
        self._merge_trace = MergeTrace(torch.stack(tokens, dim=1), size, source, matching, records, sources)
        return x

    def _merge_step(
        self, layer: int, x: Tensor, weights: Tensor, source: Tensor | None, k: Tensor, count: Tensor, packed: bool
    ) -> tuple[Merged | None, Tensor, LayerRecord | None]:
        """ToMe/ATM: bipartite matching on head-averaged keys, then the policy's selection.

        ``packed``: the result is sorted by token count and packed (see :func:`merge_tokens`).
        Returns the merge (None if nothing merged), the matching cost and, with
        ``record_merges``, the record of the decision.
        """
        merger, protected = self._merger, self.num_prefix_tokens
        if merger.split_kind(layer) == "size":
            split = size_sorted_split(weights, protected)
        else:
            split = alternating_split(weights > 0, protected)
        matches = best_matches(head_mean(k), split)
        context = MatchContext(layer, split, matches, weights, count - protected)
        selected = merger.select(context)
        cost = self._merge_cost.matching_macs(split.a_ok.sum(1), split.b_ok.sum(1))
        record = _record(merger, context, selected) if self._merge_record else None
        if not bool(selected.any()):
            return None, cost, record
        merged = merge_tokens(
            x, weights, source, split, matches, selected, protected, sort_images=packed, pack=packed
        )
        return merged, cost, record

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
        keep = merger.keep(layer, count - protected)
        if keep is None:
            return None, torch.zeros_like(count, dtype=torch.float64)
        attention = class_attention(q, k, block.attn.scale, bias)
        cost = (count * block.attn.num_heads * block.attn.head_dim).double()  # q_cls . k for every token
        if not bool((keep < count - protected).any()):
            return None, cost
        return prune_inattentive(x, weights, source, attention, keep, protected, merger.fuse_token), cost


def _packed_attention_residual(
    block: Block, tap: _QueryKeyTap, x: Tensor, bias: Tensor, layout: RaggedLayout
) -> tuple[Tensor, Tensor]:
    """``x + attn(norm1(x))`` for packed tokens ``x`` [T, C]: the linear layers on the real tokens,
    the score/softmax/value part per group of images, each padded to its longest image.

    It runs the pieces of timm's ``Attention`` (qkv, q/k norms, gate, norm, proj) around the
    attention of each group with the block's additive mask, which is what timm's fused path
    computes. Also returns the keys averaged over heads, [B, 1, W, d], for matching.
    """
    attn = block.attn
    batch, width = bias.shape[0], bias.shape[-1]
    heads, head_dim = attn.num_heads, attn.head_dim
    key = x.new_zeros(batch, 1, width, head_dim)
    h = block.norm1(x)
    qkv = attn.qkv(h)
    mixed = qkv.new_empty(len(x), heads * head_dim)
    for group in layout.groups:
        rows, length = group.stop - group.start, group.length
        # Padding slots repeat a real row: finite, and masked out of every real token's attention.
        padded = qkv.index_select(0, group.gather).view(rows, length, 3, heads, head_dim)
        mask = bias[group.start : group.stop, 0, :, :length]  # [G, 1, L]
        if x.device.type == "cpu" and length <= MATMUL_ATTENTION_MAX_TOKENS:
            q, k = attn.q_norm(padded[:, :, 0]), attn.k_norm(padded[:, :, 1])  # [G, L, H, d]
            out = _matmul_attention(q, k, padded[:, :, 2], mask, attn.scale)
            head_mean(k, dim=2, out=key[group.start : group.stop, 0, :length])
        else:
            q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, L, d]
            q, k = attn.q_norm(q), attn.k_norm(k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=attn.scale)
            # The fused CPU kernel writes [G, L, H, d] memory, so the reshape below is a view.
            out = out.transpose(1, 2)
            head_mean(k, out=key[group.start : group.stop, 0, :length])
        tap.take()  # the hooks saw these keys too; drop them
        real = out.reshape(rows * length, -1)
        if torch.is_grad_enabled():  # ``out=`` ops record no gradient
            mixed[group.packed] = real.index_select(0, group.slots)
        else:
            torch.index_select(real, 0, group.slots, out=mixed[group.packed])
    mixed = attn.norm(mixed)
    if getattr(attn, "gate", None) is not None:
        mixed = mixed * attn.gate(h).sigmoid()
    update = block.ls1(attn.proj_drop(attn.proj(mixed)))
    return _add_residual(x, update), key


# On CPU the fused attention kernel splits queries into blocks of 32 below 192 tokens, where
# three batched matmuls per head run 10-40% faster as long as a chunk of score matrices stays
# in cache (tools/attention_kernels.py); at 192+ tokens, and on GPUs, the fused kernel wins.
MATMUL_ATTENTION_MAX_TOKENS = 191
MATMUL_SCORE_ELEMENTS = 2**19  # scores per head per chunk of images (2 MiB in float32)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v per head, for [G, L, H, d] views and a [G, 1, L] mask.

    One head and one chunk of images at a time: each product reads the strided views as they
    are (no copies) and the score matrices stay small enough to be reused from cache.
    """
    images, length, heads, _ = q.shape
    chunk = max(1, MATMUL_SCORE_ELEMENTS // length**2)
    out = q.new_empty(q.shape)
    for start in range(0, images, chunk):
        part = slice(start, start + chunk)
        for head in range(heads):
            scores = torch.baddbmm(mask[part], q[part, :, head], k[part, :, head].transpose(1, 2), alpha=scale)
            out[part, :, head] = torch.bmm(scores.softmax(-1), v[part, :, head])
    return out


def _add_residual(x: Tensor, update: Tensor) -> Tensor:
    """``x + update``, in place when no graph is recorded (saves an allocation per layer)."""
    return x + update if torch.is_grad_enabled() else x.add_(update)


def head_mean(k: Tensor, dim: int = 1, out: Tensor | None = None) -> Tensor:
    """``k.mean(dim)`` over the heads of per-head keys ([B, H, N, d] by default), bit for bit,
    but 3x faster on CPU; written into ``out`` if given.

    timm's keys are a strided view of the qkv output, where a reduction over heads is slow;
    adding the head slices in order is the same arithmetic on contiguous rows.
    """
    heads = k.unbind(dim)
    if out is not None and (len(heads) == 1 or (torch.is_grad_enabled() and k.requires_grad)):
        return out.copy_(head_mean(k, dim))  # ``out=`` ops record no gradient
    if len(heads) == 1:
        return heads[0]
    total = torch.add(heads[0], heads[1], out=out)
    for head in heads[2:]:
        total.add_(head)
    return total.div_(len(heads))


def _in_input_order(value: Any, image_order: Tensor | None) -> Any:
    """``value`` (tensor with a batch dimension, or a LayerRecord) with rows back in input order."""
    if value is None or image_order is None:
        return value
    if isinstance(value, LayerRecord):
        tensors = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return dataclasses.replace(
            value, **{name: _in_input_order(t, image_order) for name, t in tensors.items() if isinstance(t, Tensor)}
        )
    return torch.empty_like(value).index_copy_(0, image_order, value)


def _record(merger: TokenMerger, context: MatchContext, selected: Tensor) -> LayerRecord:
    a_size, b_size, dst_size = context.slot_sizes()
    return LayerRecord(
        layer=context.layer,
        split=merger.split_kind(context.layer),
        threshold=merger.threshold(context.layer),
        similarity=context.matches.similarity.detach(),
        selected=(selected & context.split.a_ok).detach(),
        a_size=a_size,
        b_size=b_size,
        dst_size=dst_size,
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
    if isinstance(merger, PruningPolicy) and getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError(
            f"{merger.name} prunes by class-token attention, but {type(model).__name__} has no class token"
        )


RAGGED_MODES = ("packed", "padded")


def apply(
    model: nn.Module, merger: TokenMerger, record_merges: bool = False, ragged: str = "packed"
) -> nn.Module:
    """Patch ``model`` in place to merge tokens with ``merger``; re-patching replaces the merger.

    ``ragged`` chooses how images with different token counts run: ``packed`` runs norms, linear
    layers and the MLP on real tokens only and attention in groups of similar length, ``padded``
    runs every layer on the padded batch (for comparison). Training always runs padded.
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
