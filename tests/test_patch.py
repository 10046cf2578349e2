"""The timm patch on real timm models (random weights, no network): the facts of docs/method.md,
"What the tests hold"."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from atm_lightning import UnsupportedModelError, merge_stats, patch, unpatch
from tests.helpers import ATM_LENIENT, blocky_images, make_vit

MODELS = {
    "deit_tiny": lambda: make_vit("deit_tiny_patch16_224"),
    "vit_tiny": lambda: make_vit("vit_tiny_patch16_224"),
    "deit_tiny_distilled": lambda: make_vit("deit_tiny_distilled_patch16_224"),
    "vit_tiny_registers": lambda: make_vit("vit_tiny_patch16_224", reg_tokens=4, no_embed_class=True),
    "vit_tiny_avgpool": lambda: make_vit("vit_tiny_patch16_224", global_pool="avg", class_token=False, fc_norm=True),
    "vit_tiny_map": lambda: make_vit("vit_tiny_patch16_224", global_pool="map", class_token=False),  # SigLIP-like
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return blocky_images(4)


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_no_merging_is_bit_identical(name, images):
    """Nothing to merge, nothing changes: thresholds above 1 everywhere (and ToMe r=0) give the
    unpatched logits exactly."""
    model = MODELS[name]()
    reference = model(images)
    patch(model, "atm", alpha=1.5, beta=0.01, theta_min=1.01, split_layer=6)
    assert torch.equal(model(images), reference)
    assert (merge_stats(model).tokens == merge_stats(model).tokens[0, 0]).all()
    patch(model, "tome", r=0)
    assert torch.equal(model(images), reference)
    patch(model, "none")
    assert torch.equal(model(images), reference)
    unpatch(model)
    assert type(model).__module__.startswith("timm.")
    assert torch.equal(model(images), reference)


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_atm_merges_and_protects_prefix_tokens(name, images):
    model = MODELS[name]()
    prefix = model.num_prefix_tokens
    patch(model, "atm", trace_source=True, **ATM_LENIENT)
    logits = model(images)
    stats = merge_stats(model)
    assert logits.shape == (4, 1000) and torch.isfinite(logits).all()
    assert (stats.tokens[:, -1] < stats.tokens[:, 0]).all()
    # Prefix tokens stay in front with size 1, holding only themselves.
    assert (stats.size[:, :prefix] == 1).all()
    for p in range(prefix):
        assert (stats.source[:, p, p] == 1).all() and (stats.source[:, p].sum(-1) == 1).all()
    # Every input token ends up in exactly one output token; sizes count patches.
    assert (stats.source.sum(1) == 1).all()
    torch.testing.assert_close(stats.source.sum(-1), stats.size)


@torch.no_grad()
def test_similarity_above_threshold_and_size_split(images):
    """Every merge is above its threshold, and large tokens stay apart late in the network: from
    the recorded per-block decisions."""
    model = MODELS["deit_tiny"]()
    patch(model, "atm", record_merges=True, **ATM_LENIENT)
    model(images)
    layers = merge_stats(model).layers
    # Block 1's threshold (alpha = 1) merges nothing, so it has no step to record.
    assert [record.layer for record in layers] == list(range(1, 12))
    merged_in_size_layers = 0
    for record in layers:
        theta = record.threshold
        assert theta == pytest.approx(max(1.0 - (math.exp(0.001 * record.layer) - 1), 0.995))
        assert (record.similarity[record.selected] > theta).all()
        assert not ((record.similarity > theta) & ~record.selected & (record.a_size > 0)).any()
        if record.layer + 1 >= ATM_LENIENT["split_layer"]:
            assert record.split == "size"
            for i in range(images.shape[0]):
                b_sizes = record.b_size[i][record.b_size[i] > 0]
                a_sizes = record.a_size[i][record.a_size[i] > 0]
                assert len(a_sizes) - len(b_sizes) in (0, 1)
                assert a_sizes.max() <= b_sizes.min()
                chosen = record.selected[i]
                # No merge joins two tokens of the larger half: the source is from the smaller half.
                assert (record.a_size[i][chosen] <= b_sizes.min()).all()
                merged_in_size_layers += int(chosen.sum())
        else:
            assert record.split == "alternate"
    assert merged_in_size_layers > 0


@pytest.mark.parametrize("name", ["deit_tiny", "vit_tiny_avgpool", "vit_tiny_map"])
@torch.no_grad()
def test_duplicate_patches_merge_losslessly(name):
    """Duplicates merge losslessly: exact duplicate tokens merged with size weights and
    proportional attention change nothing."""
    model = MODELS[name]()
    model.pos_embed.data.zero_()  # without positions, equal patches give equal tokens
    g = torch.Generator().manual_seed(3)
    tiles = torch.randn(4, 3, 16, 16, generator=g)
    layout = torch.randint(0, 4, (14, 14), generator=g)
    image = torch.cat([torch.cat([tiles[layout[r, c]] for c in range(14)], dim=2) for r in range(14)], dim=1)
    image = image[None]
    reference = model(image)
    patch(model, "atm", alpha=0.999, beta=0.0, theta_min=0.999, split_layer=13)
    merged = model(image)
    tokens = merge_stats(model).tokens[0]
    assert tokens[-1] <= model.num_prefix_tokens + 4 + 4  # collapsed to about one token per tile
    torch.testing.assert_close(merged, reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["deit_tiny", "deit_tiny_distilled"])
@torch.no_grad()
def test_exact_rule_is_batch_independent(name):
    """Batch independence: with batch_rule=exact each image gets the logits and token counts it gets alone."""
    model = MODELS[name]()
    batch = blocky_images(6, seed=4)
    patch(model, "atm", batch_rule="exact", **ATM_LENIENT)
    logits = model(batch)
    tokens = merge_stats(model).tokens
    assert len(set(tokens[:, -1].tolist())) > 1, "images should merge different amounts"
    for i in range(batch.shape[0]):
        single = model(batch[i : i + 1])
        assert torch.equal(merge_stats(model).tokens[0], tokens[i])
        torch.testing.assert_close(single[0], logits[i], atol=1e-4, rtol=1e-4)
    # Batch order does not matter either.
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    torch.testing.assert_close(model(batch[perm]), logits[perm], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_min_rule_merges_the_same_count_in_every_image():
    model = MODELS["deit_tiny"]()
    batch = blocky_images(4, seed=4)
    patch(model, "atm", **ATM_LENIENT)
    exact_tokens = (model(batch), merge_stats(model).tokens)[1]
    patch(model, "atm", record_merges=True, **{**ATM_LENIENT, "batch_rule": "min"})
    model(batch)
    stats = merge_stats(model)
    assert (stats.tokens == stats.tokens[:1]).all()
    assert (stats.tokens[:, -1] >= exact_tokens[:, -1].max()).all()
    for record in stats.layers:
        counts = record.selected.sum(1)
        assert (counts == counts[0]).all()
        assert (record.similarity[record.selected] > record.threshold).all()


def _tome_reference(model: torch.nn.Module, x: torch.Tensor, r: int) -> torch.Tensor:
    """The published ToMe algorithm, written out independently: class token in set A and protected,
    alternating split, r best edges, size-weighted average, proportional attention."""
    x = model._pos_embed(model.patch_embed(x))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for block in model.blocks:
        attn = block.attn
        B, N, C = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + attn.proj(out)
        metric = k.mean(1)
        rr = min(r, (N - 1) // 2)
        if rr > 0:
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a, b = metric[:, ::2], metric[:, 1::2]
            sim = a @ b.transpose(-1, -2)
            sim[:, 0, :] = -math.inf
            node_max, node_idx = sim.max(-1)
            edge_idx = node_max.argsort(-1, descending=True)[..., None]
            unm_idx, src_idx = edge_idx[:, rr:], edge_idx[:, :rr]
            dst_idx = node_idx[..., None].gather(1, src_idx)
            unm_idx = unm_idx.sort(dim=1)[0]

            def merge(t: torch.Tensor, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx) -> torch.Tensor:
                src, dst = t[:, ::2], t[:, 1::2]
                c = t.shape[-1]
                unm = src.gather(1, unm_idx.expand(-1, -1, c))
                moved = src.gather(1, src_idx.expand(-1, -1, c))
                dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), moved, reduce="sum")
                return torch.cat([unm, dst], dim=1)

            x = merge(x * size)
            size = merge(size)
            x = x / size
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("r", [4, 13])
@torch.no_grad()
def test_tome_equals_published_algorithm(r, images):
    model = MODELS["deit_tiny"]()
    expected = _tome_reference(model, images, r)
    patch(model, "tome", r=r)
    torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)
    tokens = merge_stats(model).tokens[0]
    n, expected_tokens = 197, [197]
    for _ in range(12):
        n -= min(r, (n - 1) // 2)
        expected_tokens.append(n)
    assert tokens.tolist() == expected_tokens


@torch.no_grad()
def test_tome_per_layer_schedule():
    model = MODELS["vit_tiny"]()
    schedule = [0, 0, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]
    patch(model, "tome", r=schedule)
    model(blocky_images(2))
    tokens = merge_stats(model).tokens[0]
    assert (tokens[:-1] - tokens[1:]).tolist() == schedule


def test_unsupported_models_raise_clear_errors():
    with pytest.raises(UnsupportedModelError, match="ResNet.*only timm VisionTransformer"):
        patch(timm.create_model("resnet18", pretrained=False), "atm")
    with pytest.raises(UnsupportedModelError, match="global_pool='avgmax'"):
        patch(timm.create_model("vit_tiny_patch16_224", global_pool="avgmax", pretrained=False), "tome", r=4)
    with pytest.raises(ValueError, match="3 entries"):
        patch(MODELS["vit_tiny"](), "tome", r=[1, 2, 3])


def test_merge_stats_needs_a_forward():
    model = MODELS["vit_tiny"]()
    with pytest.raises(TypeError, match="patch"):
        merge_stats(model)
    patch(model, "tome", r=2)
    with pytest.raises(ValueError, match="no forward pass"):
        merge_stats(model)


@torch.no_grad()
def test_attention_stays_fused_with_proportional_bias(monkeypatch, images):
    """Proportional attention goes to SDPA as an additive mask: the fused kernel is still used."""
    model = MODELS["deit_tiny"]()
    assert model.blocks[0].attn.fused_attn
    masks = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    patch(model, "tome", r=8)
    model(images)
    assert len(masks) == 12 and masks[0] is None
    assert all(m is not None and m.shape == (4, 1, 1, 197 - 8 * i) for i, m in enumerate(masks) if i)


@torch.no_grad()
def test_evit_keep_rate_one_is_dense_and_pruning_follows_the_schedule(images):
    model = MODELS["deit_tiny"]()
    reference = model(images)
    patch(model, "evit", keep_rate=1.0)
    assert torch.equal(model(images), reference)
    patch(model, "evit", keep_rate=0.7, trace_source=True)
    logits = model(images)
    stats = merge_stats(model)
    # 196 patches -> ceil(0.7*196)=138 kept + 1 fused + class token, at blocks 4, 7 and 10.
    assert stats.tokens[0].tolist() == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 3
    assert (stats.tokens == stats.tokens[:1]).all()
    assert (stats.size.sum(1) == 197).all() and (stats.source.sum(1) == 1).all()
    assert not torch.allclose(logits, reference)


def test_evit_needs_a_class_token():
    with pytest.raises(UnsupportedModelError, match="no class token"):
        patch(MODELS["vit_tiny_avgpool"](), "evit", keep_rate=0.7)
    with pytest.raises(ValueError, match="past the model's 12 blocks"):
        patch(MODELS["deit_tiny"](), "evit", prune_layers=[4, 13])


@pytest.mark.parametrize(
    ("name", "settings"),
    [("deit_tiny", {}), ("deit_tiny", {"prop_attn": False}), ("vit_tiny_avgpool", {}), ("vit_tiny_registers", {})],
)
@torch.no_grad()
def test_ragged_batches_keep_padding_out_of_every_result(name, settings):
    """Images that kept different numbers of tokens run padded: padding stays zero and in place,
    every patch is held by exactly one token, sizes add up, and recorded decisions are real slots."""
    model = MODELS[name]()
    batch = blocky_images(8, seed=4)
    patch(model, "atm", record_merges=True, **(ATM_LENIENT | {"trace_source": True} | settings))
    features = model.forward_features(batch)
    stats = merge_stats(model)
    assert len(set(stats.tokens[:, -1].tolist())) > 3
    real = stats.size > 0
    assert torch.equal(real.sum(1), stats.tokens[:, -1]) and (features[~real] == 0).all()
    patches = model.patch_embed.num_patches + model.num_prefix_tokens
    assert (stats.size.sum(1) == patches).all()
    for source in stats.sources:
        assert torch.equal(source.sum(1), torch.ones(len(batch), patches))
    for record in stats.layers:
        assert not (record.selected & (record.a_size == 0)).any()
        assert (record.similarity[record.selected] > record.threshold).all()


def test_attention_kernel_is_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        patch(MODELS["deit_tiny"](), "atm", attention="nested", **ATM_LENIENT)


def test_inference_with_gradients_merges_each_image_as_alone():
    """Eval mode with gradients on (saliency maps, attacks) runs the batched step: a batch gives
    each image the input gradient it gets alone."""
    model = MODELS["deit_tiny"]()
    batch = blocky_images(4, seed=4)
    patch(model, "atm", **ATM_LENIENT)
    images = batch.clone().requires_grad_()
    model(images)[:, 0].sum().backward()
    assert len(set(merge_stats(model).tokens[:, -1].tolist())) > 1  # ragged
    for i in range(len(batch)):
        image = batch[i : i + 1].clone().requires_grad_()
        model(image)[:, 0].sum().backward()
        torch.testing.assert_close(image.grad, images.grad[i : i + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name, method, options",
    [
        ("vit_tiny", "tome", {"r": 4}),
        ("vit_tiny", "evit", {"keep_rate": 0.7}),
        ("vit_tiny", "atm", ATM_LENIENT | {"rerun_margin": 0.1}),
        ("vit_tiny", "atm", ATM_LENIENT | {"fused": False}),
        ("vit_tiny_avgpool", "atm", ATM_LENIENT),
        ("vit_tiny_registers", "atm", ATM_LENIENT),
    ],
)
@torch.no_grad()
def test_an_empty_batch_gives_empty_outputs_like_timm(name, method, options, images):
    """Zero images in, zero rows out, as from the unpatched model; the stats are empty but still
    know the dense cost (the token count comes from the input's shape, not from an image)."""
    model = MODELS[name]()
    empty = images[:0]
    expected = model(empty).shape
    patch(model, method, **options)
    assert model(empty).shape == expected
    stats = merge_stats(model)
    assert stats.tokens.shape[0] == 0 and stats.gflops.shape == (0,)
    dense = model(images[:1])
    assert stats.gflops_dense == merge_stats(model).gflops_dense and dense.shape[0] == 1
