"""Which timm models can merge tokens, and patching them in place.

Each supported family has an adapter: a check that refuses what it cannot run (naming the model
and the reason), a :class:`~.loop.BlockRunner` for its blocks, and a mixin placed in front of the
model's own class that runs its ``forward_features`` through :func:`.loop.run_blocks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from timm.layers import PatchEmbed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..flops import ViTCost
from ..merge import ATM, MatchingPolicy, PruningPolicy, TokenMerger
from ..merge.fused import fusable, is_fused_mode, load_kernel
from . import eva, vit
from .attention import check_kernel
from .compiled import backend_of, compiled_block
from .errors import UnsupportedModelError
from .loop import BlockRunner, Merging, run_block

SUPPORTED = (
    "timm VisionTransformer (ViT, DeiT, distilled DeiT, DeiT-III, CLIP, DINOv2, registers, average or "
    "attention pooling (SigLIP), any image size) and timm Eva (EVA-02, RoPE ViTs, DINOv3)"
)


class Adapter(NamedTuple):
    check: Callable[[nn.Module, str], None]
    blocks: Callable[[nn.Module], BlockRunner]
    mixin: type


ADAPTERS: dict[type, Adapter] = {
    VisionTransformer: Adapter(vit.check_vit, lambda m: vit.VitBlocks(), vit.VitMergingMixin),
    Eva: Adapter(eva.check_eva, eva.EvaBlocks, eva.EvaMergingMixin),
}
MIXINS = tuple(adapter.mixin for adapter in ADAPTERS.values())

_PATCHED_CLASSES: dict[type, type] = {}


def model_label(model: nn.Module) -> str:
    """The model's class and, when timm knows it, its architecture name."""
    name = getattr(getattr(model, "pretrained_cfg", None), "get", lambda *_: None)("architecture")
    return f"{type(model).__name__}" + (f" ({name})" if name else "")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, after its checks; :class:`UnsupportedModelError` otherwise."""
    label = model_label(model)
    for family, adapter in ADAPTERS.items():
        if isinstance(model, family):
            adapter.check(model, label)
            check_patch_embed(model, label)
            return adapter
    raise UnsupportedModelError(f"cannot merge tokens in {label}: only {SUPPORTED} are supported")


def check_patch_embed(model: nn.Module, label: str) -> None:
    """Refuse a patch embedding other than timm's single convolution: the FLOPs model counts that
    convolution alone, so a CNN stem in front of it (hybrid ViTs) would go uncounted."""
    embed = getattr(model, "patch_embed", None)
    if type(embed) is not PatchEmbed or not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        raise UnsupportedModelError(
            f"cannot merge tokens in {label}: its patch embedding is {type(embed).__name__}, not timm's "
            f"PatchEmbed (one convolution); a CNN stem, as hybrid ViTs have, is not supported"
        )


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the model and the reason, or return."""
    adapter_for(model)


def _merging_class(cls: type, mixin: type) -> type:
    """A subclass of the model's class with merging, made once per class (stable for pickling)."""
    if cls not in _PATCHED_CLASSES:
        name = f"Merging{cls.__name__}"
        module = mixin.__module__
        patched = type(name, (mixin, cls), {"__module__": module, "__qualname__": name})
        setattr(__import__(module, fromlist=[name]), name, patched)  # so pickle finds it by name
        _PATCHED_CLASSES[cls] = patched
    return _PATCHED_CLASSES[cls]


def _check_merger(model: nn.Module, merger: TokenMerger) -> None:
    """Mergers that need what the model lacks: a class token, RoPE-free keys (pruning scores
    the class token's attention on the keys as matched, before RoPE), or classes to rerun by."""
    if isinstance(merger, PruningPolicy) and getattr(model, "rope", None) is not None:
        raise UnsupportedModelError(
            f"{merger.name} (pruning by class-token attention) is not supported on {model_label(model)}, a RoPE model"
        )
    if merger.last_block_prefix_only:
        vit.check_prefix_only(model, model_label(model))
    if merger.rerun_margin > 0 and getattr(model, "num_classes", 0) < 2:
        raise ValueError(
            f"rerun_margin compares class probabilities, but {model_label(model)} has "
            f"{getattr(model, 'num_classes', 0)} classes; set rerun_margin 0"
        )
    if getattr(model, "cls_token", None) is not None:
        return
    if isinstance(merger, PruningPolicy):
        raise UnsupportedModelError(
            f"{merger.name} prunes by class-token attention, but {type(model).__name__} has no class token"
        )
    if isinstance(merger, MatchingPolicy) and merger.needs_class_attention:
        raise UnsupportedModelError(
            f"{merger.name} weighs merges by the class token's attention (attention_power), but "
            f"{type(model).__name__} has no class token; set attention_power 0"
        )


def apply(
    model: nn.Module,
    merger: TokenMerger,
    record_merges: bool = False,
    compile: bool | str = False,
    fused: bool | str = "auto",
    attention: str = "sdpa",
) -> nn.Module:
    """Patch ``model`` in place to merge tokens with ``merger``; re-patching replaces the merger.

    ``compile`` runs each block, merge step included, through ``torch.compile`` (:mod:`.compiled`;
    a string names its backend). VisionTransformer only. ``fused`` runs ATM's merge step on the
    CPU in the compiled C++ kernel (:mod:`.kernel`): ``"auto"`` where it can (ATM's exact rule,
    a ViT without q/k norms, built by the first CPU inference forward; where it cannot be built
    the batched step runs after one warning), True always (an error where it cannot), False never.
    ``attention`` names the attention kernel of padded batches (:mod:`.attention`).
    """
    check_kernel(attention)
    patched = isinstance(model, MIXINS)
    adapter = None if patched else adapter_for(model)
    merger.check(len(model.blocks))
    _check_merger(model, merger)
    fused = _fused_setting(model, merger, fused, compile)
    backend = backend_of(compile) if compile else None  # None: eager
    if backend is not None and not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"compile=True supports timm VisionTransformer only, not {model_label(model)}")
    if patched:
        blocks, cost = model._merging.blocks, model._merging.cost
    else:
        cost = ViTCost.from_model(model)
        model.__class__ = _merging_class(type(model), adapter.mixin)
        blocks = next(a for cls, a in ADAPTERS.items() if isinstance(model, cls)).blocks(model)
    block = run_block if backend is None else compiled_block(backend)
    model._merging = Merging(merger, blocks, cost, model.num_prefix_tokens, record_merges, fused, attention, block)
    return model


def _fused_setting(model: nn.Module, merger: TokenMerger, fused: bool | str, compile: bool | str) -> bool | str:
    """``fused`` as the forward uses it: False where the kernel cannot run this model and policy
    (``"auto"``), an error naming the fix where it was asked for (True)."""
    if not is_fused_mode(fused):
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    problem = None
    if not fusable(merger):
        problem = "batch_rule='min'" if isinstance(merger, ATM) else f"{type(merger).__name__}"
        problem = f"{problem} has no fused step (it runs ATM's exact rule)"
    elif not isinstance(model, VisionTransformer) or any(
        not isinstance(b.attn.q_norm, nn.Identity) or not isinstance(b.attn.k_norm, nn.Identity) for b in model.blocks
    ):
        problem = f"{model_label(model)} is not a ViT without q/k norms, which the kernel's attention needs"
    elif compile:
        problem = "compile=True compiles the batched step instead"
    if fused is True:
        if problem is not None:
            raise ValueError(f"fused=True: {problem}; set fused to false or auto (--model.fused false)")
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            warnings.warn(
                f"fused=True runs on float32 CPU inference only; this model is {dtype}, so the batched step "
                f"runs (same merges). Use model.float() for the fused step.",
                stacklevel=3,
            )
        load_kernel()
    return False if problem is not None else fused


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is timm's own class again, with no hooks."""
    if isinstance(model, MIXINS):
        model._merging.blocks.remove_hooks()
        model.__class__ = type(model).__bases__[1]
        del model._merging
    return model
