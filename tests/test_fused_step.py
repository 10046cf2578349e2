"""The compiled CPU kernel merges what the batched step merges, and runs only where it may."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.evaluation.options import parse_method
from atm_lightning.merge import ATM, TokenState, class_attention, from_config_file, match_step, padding_mask
from atm_lightning.merge import fused as fused_module
from atm_lightning.patch import build_fused_step, kernel
from atm_lightning.patch.attention import attention_bias
from atm_lightning.patch.loop import BlockAttention
from tests.helpers import ATM_LENIENT, CONFIGS, blocky_images, make_vit

MISSING = fused_module.missing_build_tool()
needs_kernel = pytest.mark.skipif(MISSING is not None, reason=f"the fused step cannot be built here: {MISSING}")

OPTIONS = {  # every switch of the fused kernel, each against the paper's ATM
    "paper": {},
    "per_head": {"keys": "per_head"},
    "size_weighted": {"size_weighted": True, "theta_min": 0.99},
    "attention_sqrt": {"keys": "per_head", "size_weighted": True, "attention_power": 0.5, "keep_norm": True},
    "attention_pow": {"attention_power": 1.5, "prop_attn": False, "theta_min": 0.99},
    "keep_norm": {"keep_norm": True},
}
MODELS = {  # protected tokens: 1, 4 (class and 3 registers), 0 (no class token)
    "class": {},
    "registers": {"reg_tokens": 3},
    "no_class": {"class_token": False, "global_pool": "avg"},
}
NEAR = 1e-4  # decisions this close to the threshold may go either way between the two steps


def _padded(state: TokenState) -> torch.Tensor:
    return state.padded()


@needs_kernel
@pytest.mark.parametrize("protected", [0, 1, 3])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_kernel_step_equals_the_batched_step(option, ragged, protected):
    """Before the first merge (every image whole) or ragged (some images with too few tokens to
    split), both splits: the same counts, sizes and, to float rounding, tokens, in input order.
    Seeds whose decisions lie within NEAR of the threshold are skipped (rounding may tip them)."""
    if protected == 0 and "attention_power" in OPTIONS[option]:
        pytest.skip("attention weighting needs a class token")
    heads, head_dim, channels, width = 3, 4, 12, 23
    counts = torch.tensor([23, 23, 19, 14, 9, 4]) if ragged else torch.full((4,), width)
    batch, real = len(counts), torch.arange(width) < counts[:, None]
    policy = ATM(**{**OPTIONS[option], "alpha": 0.9, "beta": 0.0, "theta_min": 0.5, "split_layer": 5})
    compared = 0
    for seed in range(6):
        torch.manual_seed(seed)
        keys = torch.randn(batch, heads, width, head_dim)
        # Several tokens near token 5: sources choose the same destination, without exact ties.
        keys[:, :, 2::4] = keys[:, :, 5:6] + 0.05 * keys[:, :, 2::4]
        keys = keys * real[:, None, :, None]
        query = torch.randn(batch, heads, 1, head_dim)
        x = torch.randn(batch, width, channels) * real[..., None]
        size = (torch.randint(1, 5, (batch, width)) * real).float() if ragged else None
        state = TokenState(x, counts - protected if ragged else width - protected, protected, size)
        bias = attention_bias(size, policy.prop_attn, torch.float32)
        cls = class_attention(query, keys, 0.5, bias) if policy.needs_class_attention else None
        neg = padding_mask(bias, policy.prop_attn) if ragged else None
        packed = TokenState(x[real], counts - protected, protected, size, real_rows=real.view(-1).nonzero().view(-1))
        for layer in (0, 5):  # the alternating split, then the size-sorted one
            move, record = match_step(policy, layer, state, keys, cls, neg, protected, record=True)
            batched = move.apply(move.plan.width or int(move.plan.widest()) + protected)
            real_rows = record.similarity > float("-inf")
            if ((record.similarity[real_rows] - record.threshold).abs() < NEAR).any():
                continue
            given = BlockAttention(x, keys, cls) if layer else BlockAttention(x, keys, None, query, 0.5)  # both ways
            fused = kernel.fused_step(policy, layer, packed, given, protected)
            assert fused is not packed, "something should merge"
            assert torch.equal(fused.free, batched.free)
            width_out = batched.size.shape[1]
            assert torch.equal(fused.size[:, :width_out], batched.size)
            torch.testing.assert_close(_padded(fused)[:, :width_out], batched.x, rtol=1e-5, atol=1e-5)
            compared += 1
    assert compared >= 6


def _atm(**settings) -> ATM:
    return ATM(**{**ATM_LENIENT, "split_layer": 3, **settings})


def _run(model, policy, images, fused: bool, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    patch(model, policy, fused=fused)
    logits, tokens = [], []
    with torch.inference_mode():
        for image in images.split(batch):
            logits.append(model(image))
            tokens.append(merge_stats(model).tokens)
    return torch.cat(logits), torch.cat(tokens)


def _near_threshold(model, policy, images) -> torch.Tensor:
    """[B] images of which some decision of the batched step lay within NEAR of its threshold."""
    patch(model, policy, fused=False, record_merges=True)
    with torch.inference_mode():
        model(images)
    near = torch.zeros(len(images), dtype=torch.bool)
    for record in merge_stats(model).layers:
        near |= ((record.similarity - record.threshold).abs() < NEAR).any(dim=1)
    return near


@needs_kernel
@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_the_kernel_merges_what_the_batched_step_merges(option, model_kind):
    if model_kind == "no_class" and "attention_power" in OPTIONS[option]:
        pytest.skip("attention weighting needs a class token")
    model = make_vit("vit_tiny_patch16_224", depth=6, img_size=96, **MODELS[model_kind])
    images = blocky_images(6, seed=1, size=96)
    policy = _atm(**OPTIONS[option])
    batched_logits, batched_tokens = _run(model, policy, images, fused=False, batch=6)
    assert (batched_tokens[:, -1] < batched_tokens[:, 0]).sum() >= 2, "most images should merge"
    assert (batched_tokens[:, 3] > batched_tokens[:, -1]).any(), "the size-sorted split should merge too"
    assert (batched_tokens != batched_tokens[:1]).any(), "the batch should turn ragged"
    clear = ~_near_threshold(model, policy, images)
    assert clear.sum() >= 2
    for batch in (1, 6):
        fused_logits, fused_tokens = _run(model, policy, images, fused=True, batch=batch)
        assert torch.equal(fused_tokens[clear], batched_tokens[clear])
        torch.testing.assert_close(fused_logits[clear], batched_logits[clear], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_the_kernel_runs_at_cpu_float32_inference_only(monkeypatch):
    calls = []
    real = kernel.fused_step

    def counted(*args):
        calls.append(len(args[2].x))
        return real(*args)

    from atm_lightning.patch import loop

    monkeypatch.setattr(loop, "fused_step", counted)
    model = make_vit("vit_tiny_patch16_224", depth=4, img_size=96)
    images = blocky_images(2, seed=1, size=96)
    patch(model, _atm(), fused=True)

    def steps(forward) -> int:
        calls.clear()
        forward()
        assert merge_stats(model).fused == bool(calls)  # the record says how it ran
        return len(calls)

    depth = len(model.blocks) - 1  # block 1's threshold (alpha = 1) merges nothing: no step there
    with torch.inference_mode():
        assert steps(lambda: model(images[:1])) == depth
        assert steps(lambda: model(images)) == depth
    with torch.no_grad():
        assert steps(lambda: model(images)) == depth
    assert steps(lambda: model(images)) == 0  # gradients recorded: the kernel has no backward
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert steps(lambda: model(images)) == 0  # autocast: bfloat16 keys, the batched step
    patch(model, _atm(), fused=True, record_merges=True)
    with torch.inference_mode():
        assert steps(lambda: model(images[:1])) == 0  # recording needs the batched step's decisions
    patch(model, _atm(trace_source=True), fused=True)
    with torch.inference_mode():
        assert steps(lambda: model(images)) == 0  # sources travel with the tokens: batched


def test_fused_needs_atm_on_a_plain_vit_and_says_so():
    model = make_vit("vit_tiny_patch16_224", depth=2, img_size=96)
    with pytest.raises(ValueError, match=r"ToMe has no fused step.*--model.fused false"):
        patch(model, "tome", fused=True, r=2)
    with pytest.raises(ValueError, match="fused=true runs ATM's exact rule only"):
        parse_method("tome:r=9,fused=true")
    with pytest.raises(ValueError, match="batch_rule='min' has no fused step"):
        patch(model, _atm(batch_rule="min"), fused=True)
    patch(model, _atm(batch_rule="min"), fused="auto")  # the min rule couples the images: batched
    assert model._merging.fused is False
    with pytest.raises(ValueError, match="without q/k norms"):
        patch(make_vit("vit_tiny_patch16_224", depth=2, img_size=96, qk_norm=True), _atm(), fused=True)
    with pytest.warns(UserWarning, match="this model is torch.bfloat16, so the batched step runs"):
        patch(model.to(torch.bfloat16), _atm(), fused=True)


def test_fused_without_compiler_names_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    fused_module.load_kernel.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler.*fused=False"):
            fused_module.load_kernel()
    finally:
        fused_module.load_kernel.cache_clear()


@needs_kernel
def test_loading_the_kernel_keeps_its_name():
    """torch's builder appends its own flags to the lists it is given; the flags the kernel's
    cache name hashes must not change, or every later load would build it again."""
    name = fused_module.kernel_name()
    fused_module.load_kernel.cache_clear()
    try:
        fused_module.load_kernel()
        assert fused_module.kernel_name() == name
    finally:
        fused_module.load_kernel.cache_clear()


def test_config_method_takes_execution_options():
    method = parse_method(f"{CONFIGS}/vit_t_atm.yaml:fused=true")
    assert method.fused and method.label == "vit_t_atm:fused=true"
    assert method.merger == from_config_file(CONFIGS / "vit_t_atm.yaml")
    assert parse_method(f"{CONFIGS}/vit_t_atm.yaml").fused == "auto"  # as atm validate runs it
    assert parse_method(f"{CONFIGS}/vit_t_atm.yaml:fused=false").fused is False
    with pytest.raises(ValueError, match="only .* may follow it"):
        parse_method(f"{CONFIGS}/vit_t_atm.yaml:theta_min=0.5")
    with pytest.raises(ValueError, match="fused must be true, false or auto"):
        parse_method("atm:fused=1")


@needs_kernel
@torch.no_grad()
def test_fused_auto_builds_on_the_first_cpu_inference_forward(monkeypatch):
    """``fused="auto"``: ATM takes the fused step at inference once the kernel is there, other
    methods keep their own step, training keeps the eager one, and a bad value is refused."""
    model = make_vit("vit_tiny_patch16_224", depth=4, img_size=96)
    images = blocky_images(2, seed=1, size=96)
    merging = patch(model, _atm(), fused="auto")._merging
    assert merging.fused == "auto"  # nothing built at patch time
    model(images)
    assert merging.fused is True and merge_stats(model).fused
    merging = patch(model, _atm(), fused="auto")._merging
    assert build_fused_step(model) and merging.fused is True  # settled before any forward
    assert patch(model, "tome", r=2, fused="auto")._merging.fused is False
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        patch(model, _atm(), fused="yes")


@torch.no_grad()
def test_fused_auto_without_compiler_warns_once_and_runs_the_batched_step(monkeypatch):
    model = make_vit("vit_tiny_patch16_224", depth=4, img_size=96)
    images = blocky_images(2, seed=1, size=96)
    patch(model, _atm(), fused=False)
    eager, eager_tokens = model(images), merge_stats(model).tokens
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    fused_module.load_kernel.cache_clear()  # as on a machine that never built it
    try:
        merging = patch(model, _atm(), fused="auto")._merging
        with pytest.warns(UserWarning, match="batched step runs.*no C\\+\\+ compiler.*--model.fused false"):
            assert torch.equal(model(images), eager)
        assert torch.equal(merge_stats(model).tokens, eager_tokens)
        assert merging.fused is False and not merge_stats(model).fused
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(images)  # said once
    finally:
        fused_module.load_kernel.cache_clear()


@needs_kernel
@pytest.mark.shared
def test_fused_shipped_points_agree_on_real_images(shared_weights, shared_images):
    from atm_lightning.data.images import evenly_spaced, image_paths, load_images
    from atm_lightning.models import create_model

    model = create_model("vit_tiny_patch16_224", weights=str(shared_weights), num_classes=None).eval()
    images, _ = load_images(evenly_spaced(image_paths([shared_images]), 12), "vit_tiny_patch16_224")
    for name in ("vit_t_atm_20", "vit_t_atm", "vit_t_atm_40"):
        policy = dataclasses.replace(from_config_file(CONFIGS / f"{name}.yaml"), rerun_margin=0.0)
        eager_logits, eager_tokens = _run(model, policy, images, fused=False, batch=12)
        assert eager_tokens[:, -2].float().mean() < 0.7 * eager_tokens[0, 0], name
        for batch in (1, 12):
            fused_logits, fused_tokens = _run(model, policy, images, fused=True, batch=batch)
            assert torch.equal(fused_tokens, eager_tokens), name
            assert torch.equal(fused_logits.argmax(-1), eager_logits.argmax(-1)), name
            torch.testing.assert_close(fused_logits, eager_logits, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_module_builds_the_fused_step_before_the_first_timed_batch():
    """The module's default ``fused="auto"`` is settled when evaluation starts, so that a first
    build (about a minute) is not counted in the first batch's img/s."""
    from atm_lightning.module import TokenMergingModule

    module = TokenMergingModule("vit_tiny_patch16_224", num_classes=3, merger=_atm(), model_kwargs={"img_size": 96, "depth": 4})
    assert module.hparams.fused == "auto" and module.model._merging.fused == "auto"
    module.on_validation_start()
    assert module.model._merging.fused is True


@needs_kernel
def test_module_keeps_fused_after_the_merge_visualisation():
    """``--model.fused true`` reaches the patched model, and a callback that patches the model
    for a while (source tracing) gives it back with the same execution options."""
    from atm_lightning.callbacks.visualization import _trace_sources
    from atm_lightning.module import TokenMergingModule

    module = TokenMergingModule(
        "vit_tiny_patch16_224", num_classes=3, merger=_atm(), fused=True, model_kwargs={"img_size": 96, "depth": 4}
    )
    assert module.model._merging.fused
    sources = _trace_sources(module, blocky_images(2, seed=1, size=96))
    assert sources.shape[-1] == 37  # traced with the batched step
    assert module.model._merging.fused and not module.model._merging.policy.trace_source


def _attention_reference(qkv, count, bias, heads, scale):
    """Per image and head, softmax(q k^T * scale + bias) v; keys per head; the class row averaged."""
    dim = qkv.shape[1] // (3 * heads)
    mixed, keys, first = torch.empty(len(qkv), heads * dim), [], []
    start = 0
    for i, n in enumerate(count.tolist()):
        q, k, v = qkv[start : start + n].view(n, 3, heads, dim).permute(1, 2, 0, 3)  # [H, n, d] each
        probs = (q @ k.transpose(1, 2) * scale + bias[i, :n]).softmax(-1)
        mixed[start : start + n] = (probs @ v).transpose(0, 1).reshape(n, heads * dim)
        keys.append(k)
        first.append(probs[:, 0].mean(0))
        start += n
    return mixed, keys, first


@needs_kernel
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("prop_attn", [False, True])
def test_packed_attention_kernel_equals_per_image_attention(per_head, prop_attn):
    g = torch.Generator().manual_seed(0)
    heads, dim, width = 3, 8, 13
    count = torch.tensor([13, 11, 11, 6, 4, 1])
    size = torch.zeros(len(count), width)
    for i, n in enumerate(count.tolist()):
        size[i, :n] = torch.randint(1, 5, (n,), generator=g).float()
    qkv = torch.randn(int(count.sum()), 3 * heads * dim, generator=g)
    bias = attention_bias(size, prop_attn, torch.float32)
    with torch.inference_mode():
        mixed, keys, first = fused_module.fused_packed_attention(qkv, count, bias, heads, 0.3, per_head, True)
    want_mixed, want_keys, want_first = _attention_reference(qkv, count, bias[:, 0, 0], heads, 0.3)
    torch.testing.assert_close(mixed, want_mixed, rtol=1e-5, atol=1e-6)
    assert keys.shape == (len(count), heads if per_head else 1, width, dim)
    for i, n in enumerate(count.tolist()):
        want = want_keys[i] if per_head else want_keys[i].mean(0, keepdim=True)
        torch.testing.assert_close(keys[i, :, :n], want, rtol=1e-5, atol=1e-6)
        assert not keys[i, :, n:].any()  # zero past the count
        torch.testing.assert_close(first[i, :n], want_first[i], rtol=1e-5, atol=1e-6)
        assert not first[i, n:].any()


@needs_kernel
@pytest.mark.parametrize("qk_norm", [False, True])
def test_packed_batches_attend_in_the_kernel_unless_the_block_normalises_q_and_k(monkeypatch, qk_norm):
    """Once the kernel merged, the tokens stay packed and ViT blocks attend in the kernel; a model
    with q/k norms keeps the batched step (``auto``)."""
    calls = []
    kernel = fused_module.load_kernel()
    monkeypatch.setattr(fused_module, "load_kernel", lambda: _Spy(kernel, calls))
    model = make_vit("vit_tiny_patch16_224", depth=4, img_size=96, qk_norm=qk_norm)
    images = blocky_images(4, seed=1, size=96)
    patch(model, _atm(), fused="auto")
    with torch.inference_mode():
        model(images)
    tokens = merge_stats(model).tokens  # [B, depth + 1]
    merged = [layer for layer in range(4) if (tokens[:, layer + 1] < tokens[:, layer]).any()]
    assert merged, "the batch should merge"
    packed = [tokens[:, layer].tolist() for layer in range(merged[0] + 1, 4)]
    assert calls == ([] if qk_norm else packed)


class _Spy:
    """The kernel module, counting its packed_attention calls."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def packed_attention(self, *args):
        self.calls.append(args[1].tolist())
        return self.kernel.packed_attention(*args)

    def __getattr__(self, name: str):
        return getattr(self.kernel, name)
