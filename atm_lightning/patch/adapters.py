"""Which timm models can merge tokens, and patching them in place.

Each supported family has an adapter: a check that refuses what it cannot run (naming the model
and the reason), a :class:`~.loop.BlockRunner` for its blocks, and a mixin placed in front of the
model's own class that runs its ``forward_features`` through :func:`.loop.run_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from timm.layers import PatchEmbed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..flops import ViTCost
from ..merge import MatchingPolicy, PruningPolicy, TokenMerger
from ..merge.fused import check_fusable, fusable, is_fused_mode, load_kernel
from . import eva, vit
from .errors import UnsupportedModelError
from .compiled import CompiledVitBlocks, backend_of
from .loop import RAGGED_MODES, BlockRunner, Merging

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
    ragged: str = "packed",
    compile: bool | str = False,
    fused: bool | str = False,
) -> nn.Module:
    """Patch ``model`` in place to merge tokens with ``merger``; re-patching replaces the merger.

    ``ragged`` chooses how images with different token counts run: ``packed`` runs norms, linear
    layers and the MLP on real tokens only and attention in groups of similar length, ``padded``
    runs every layer on the padded batch (for comparison). Training always runs padded.
    ``compile`` runs each block's attention and MLP residuals through ``torch.compile``
    (:mod:`.compiled`; a string names its backend); the merge step stays eager. VisionTransformer only.
    ``fused`` runs ATM's merge step on the CPU as one compiled function, for one image or a
    packed batch (:mod:`atm_lightning.merge.fused`), built here on first use. ``"auto"`` does so
    where it can: for ATM, built by the first forward that can use it (a CPU inference pass), and
    where it cannot be built the eager step runs, with one warning that says why.
    """
    if ragged not in RAGGED_MODES:
        raise ValueError(f"ragged must be one of {RAGGED_MODES}, got {ragged!r}")
    patched = isinstance(model, MIXINS)
    adapter = None if patched else adapter_for(model)
    merger.check(len(model.blocks))
    _check_merger(model, merger)
    if not is_fused_mode(fused):
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    if fused is True:
        check_fusable(merger)
        load_kernel()
    elif fused == "auto" and not fusable(merger):
        fused = False  # nothing to fuse: the policy's own step runs
    backend = backend_of(compile) if compile else None  # None: eager
    if backend is not None and not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"compile=True supports timm VisionTransformer only, not {model_label(model)}")
    if patched and getattr(model._merging.blocks, "backend", None) == backend:
        blocks, cost = model._merging.blocks, model._merging.cost
    else:
        if patched:
            model._merging.blocks.remove_hooks()
            cost = model._merging.cost
        else:
            cost = ViTCost.from_model(model)
            model.__class__ = _merging_class(type(model), adapter.mixin)
        family = next(a for cls, a in ADAPTERS.items() if isinstance(model, cls))
        blocks = family.blocks(model) if backend is None else CompiledVitBlocks(backend)
    model._merging = Merging(merger, blocks, cost, model.num_prefix_tokens, record_merges, ragged, fused)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is timm's own class again, with no hooks."""
    if isinstance(model, MIXINS):
        model._merging.blocks.remove_hooks()
        model.__class__ = type(model).__bases__[1]
        del model._merging
    return model
