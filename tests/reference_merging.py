"""A reference of ToMe, ATM and EViT in a timm ViT, one image at a time, written to be read.

No batching, no padding, no bookkeeping: each block's attention with ``log(size)`` added to its
logits, then the policy's step on the image's own tokens, then the MLP, as docs/method.md states
the method. The engine must give the same token counts and, to float rounding, the same logits.
Where a decision sits within ``NEAR`` of its boundary (a similarity at its threshold, two
destinations or two sources scoring alike), rounding may tip it either way: such images are
reported as ``near`` and excused from exact agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atm_lightning.merge import ATM, EViT, MatchingPolicy, TokenMerger, ToMe

NEAR = 1e-5


@dataclass
class Reference:
    logits: Tensor  # [B, classes]
    counts: Tensor  # [B, depth + 1] tokens entering each block, then after the last
    near: Tensor  # [B] bool: some decision of this image lay within NEAR of its boundary


@torch.no_grad()
def reference_forward(model: nn.Module, images: Tensor, policy: TokenMerger) -> Reference:
    """Run ``model`` (an unpatched timm VisionTransformer with a class token) image by image."""
    if isinstance(policy, ATM) and policy.batch_rule != "exact":
        raise ValueError("the reference merges each image alone: batch_rule='exact' only")
    logits, counts, near = [], [], []
    for image in images:
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]
        out, count, close = _image(model, tokens, policy)
        logits.append(out)
        counts.append(count)
        near.append(close)
    return Reference(torch.stack(logits), torch.tensor(counts), torch.tensor(near))


def _image(model: nn.Module, x: Tensor, policy: TokenMerger) -> tuple[Tensor, list[int], bool]:
    protected = model.num_prefix_tokens
    size = torch.ones(len(x))
    counts, near, merged_yet = [len(x)], False, False
    for layer, block in enumerate(model.blocks):
        bias = torch.log(size) if merged_yet and policy.prop_attn else None
        x, q_cls, keys = _attention(block, x, bias)
        if policy.merges and policy.merges_in(layer):
            if isinstance(policy, EViT):
                new = _prune(policy, layer, x, size, _class_attention(block, q_cls, keys, bias), protected)
            else:
                cls = _class_attention(block, q_cls, keys, bias) if policy.needs_class_attention else None
                new = _match(policy, layer, x, size, keys, cls, protected)
            x, size, close = new
            near |= close
            merged_yet |= len(x) < counts[-1]
        x = x + block.ls2(block.mlp(block.norm2(x)))
        counts.append(len(x))
    features = model.norm(x[None])
    return model.forward_head(features)[0], counts, near


def _attention(block: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``x + attn(norm1(x))`` with ``bias`` [N] added to every query's logits; the class token's
    query [H, d] and the keys [H, N, d]."""
    attn = block.attn
    n = len(x)
    q, k, v = attn.qkv(block.norm1(x)).view(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-1, -2) + (0 if bias is None else bias)
    mixed = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    return x + block.ls1(attn.proj(attn.norm(mixed))), q[:, 0], k


def _class_attention(block: nn.Module, q_cls: Tensor, keys: Tensor, bias: Tensor | None) -> Tensor:
    """[N] the class token's attention to every token, averaged over heads."""
    logits = torch.einsum("hd,hnd->hn", q_cls * block.attn.scale, keys) + (0 if bias is None else bias)
    return logits.softmax(-1).mean(0)


def _features(policy: MatchingPolicy, keys: Tensor) -> Tensor:
    """[N, W] unit rows whose dot products are the similarities the policy matches on."""
    if policy.key_form == "per_head":
        heads = keys.shape[0]
        normed = keys / (keys.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(heads))
        return normed.transpose(0, 1).reshape(keys.shape[1], -1)
    mean = keys.mean(0)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _split(policy: MatchingPolicy, layer: int, size: Tensor, protected: int) -> tuple[list[int], list[int]]:
    """Positions of the sources and of the destinations."""
    body = list(range(protected, len(size)))
    if policy.split_kind(layer) == "size":
        body.sort(key=lambda j: float(size[j]))  # stable: equal sizes keep position order
        half = (len(body) + 1) // 2
        return body[:half], body[half:]
    return [j for j in body if j % 2 == 0], [j for j in body if j % 2 == 1]


def _match(
    policy: MatchingPolicy, layer: int, x: Tensor, size: Tensor, keys: Tensor, cls: Tensor | None, protected: int
) -> tuple[Tensor, Tensor, bool]:
    a, b = _split(policy, layer, size, protected)
    if not a or not b:
        return x, size, False
    feats = _features(policy, keys)
    scores = feats[a] @ feats[b].T
    if isinstance(policy, ATM) and (policy.size_weighted or policy.attention_power > 0):
        n_a, n_b = size[a][:, None], size[b][None, :]
        weight = torch.ones_like(scores)
        if policy.size_weighted:
            weight = weight * (2 * n_a * n_b / (n_a + n_b))
        if policy.attention_power > 0:
            tokens = len(a) + len(b)
            share = (tokens * cls[a][:, None] * n_b + tokens * cls[b][None, :] * n_a) / (n_a + n_b)
            weight = weight * share.clamp_min(1e-6) ** policy.attention_power
        scores = 1 - (1 - scores) * weight
    best, dst = scores.max(dim=1)
    top2 = scores.topk(min(2, len(b)), dim=1).values
    tied = (top2[:, 0] - top2[:, -1] <= NEAR) & (len(b) > 1)
    if isinstance(policy, ToMe):
        limit = min(policy.r_at(layer), (len(a) + len(b)) // 2)
        order = best.argsort(descending=True)
        chosen = torch.zeros(len(a), dtype=torch.bool)
        chosen[order[:limit]] = True
        ranked = best[order]
        near = bool(limit < len(a) and limit > 0 and ranked[limit - 1] - ranked[limit] <= NEAR)
    else:
        theta = policy.threshold(layer)
        chosen = best > theta
        near = bool(((best - theta).abs() <= NEAR).any())
    near |= bool((tied & chosen).any())
    if not chosen.any():
        return x, size, near
    x, size = _merge(x, size, a, b, chosen, dst, protected, isinstance(policy, ATM) and policy.keep_norm)
    return x, size, near


def _merge(
    x: Tensor, size: Tensor, a: list[int], b: list[int], chosen: Tensor, dst: Tensor, protected: int, keep_norm: bool
) -> tuple[Tensor, Tensor]:
    """Each chosen source into its destination: the size-weighted mean (at the parts' mean length
    with ``keep_norm``); order ``[protected, unmerged sources, destinations]`` by position."""
    total, length = {}, {}
    new_size = size.clone()
    for i in chosen.nonzero().view(-1).tolist():
        s, d = a[i], b[int(dst[i])]
        if d not in total:
            total[d], length[d] = x[d] * size[d], x[d].norm() * size[d]
        total[d] = total[d] + x[s] * size[s]
        length[d] = length[d] + x[s].norm() * size[s]
        new_size[d] += size[s]
    out = x.clone()
    for d, summed in total.items():
        mean = summed / new_size[d]
        out[d] = mean * (length[d] / new_size[d] / mean.norm().clamp_min(1e-12)) if keep_norm else mean
    gone = {a[i] for i in chosen.nonzero().view(-1).tolist()}
    order = list(range(protected)) + sorted(set(a) - gone) + sorted(b)
    return out[order], new_size[order]


def _prune(
    policy: EViT, layer: int, x: Tensor, size: Tensor, attention: Tensor, protected: int
) -> tuple[Tensor, Tensor, bool]:
    """EViT: keep the ``ceil(rate * M)`` most attended tokens; fuse the others by attention."""
    body = torch.arange(protected, len(x))
    keep = max(1, math.ceil(len(body) * policy.keep_rate - 1e-9))
    if keep >= len(body):
        return x, size, False
    ranked = attention[body].sort(descending=True)
    near = bool(ranked.values[keep - 1] - ranked.values[keep] <= NEAR * ranked.values[keep - 1])  # attention ~ 1/N: relative
    kept = body[ranked.indices[:keep]].sort().values
    pruned = body[ranked.indices[keep:]]
    rows, sizes = [x[:protected], x[kept]], [size[:protected], size[kept]]
    if policy.fuse_token:
        weight = attention[pruned][:, None]
        rows.append(((weight * x[pruned]).sum(0) / weight.sum().clamp_min(1e-12))[None])
        sizes.append(size[pruned].sum()[None])
    return torch.cat(rows), torch.cat(sizes), near
