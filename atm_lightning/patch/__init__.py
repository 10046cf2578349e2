"""timm integration: one call patches a timm ViT in place to merge tokens.

``loop.py`` runs the blocks for any architecture, with the merge steps of
:mod:`atm_lightning.merge.step`; ``adapters.py`` says which models are supported and patches
them; ``vit.py`` adapts timm's VisionTransformer and ``eva.py`` timm's Eva (RoPE at merged
positions: ``rope.py``); ``pooling.py`` pools merged tokens; ``attention.py`` attends padded
batches; ``kernel.py`` runs CPU forwards in the compiled kernel; ``stats.py`` reports the last forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..merge import TokenMerger, make_merger
from .attention import ATTENTION_KERNELS
from .kernel import kernel_ready
from .rerun import running_dense
from .stats import LayerRecord, MergeStats, MergeTrace, merge_stats
from .adapters import MIXINS, apply, check_supported, remove
from .errors import UnsupportedModelError


def patch(
    model: nn.Module,
    method: str | TokenMerger = "atm",
    *,
    record_merges: bool = False,
    compile: bool | str = False,
    fused: bool | str = "auto",
    attention: str = "sdpa",
    **settings,
) -> nn.Module:
    """Make ``model`` merge tokens at inference time; returns the same (still timm) model.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, registers, average or
            attention pooling, any image size) or ``Eva`` (EVA-02, RoPE ViTs, DINOv3).
        method: ``"atm"``, ``"tome"``, ``"evit"`` or ``"none"`` (dense, with token/FLOPs
            accounting), or a :class:`~atm_lightning.merge.TokenMerger` instance.
        record_merges: keep every block's merge decisions in :func:`merge_stats` (tests, debugging).
        compile: run each block, its merge step included, through ``torch.compile`` with dynamic
            token counts (one graph break per merging block, where the host reads the new width).
            A string names the backend (e.g. ``"aot_eager"``); True is inductor.
        fused: run ATM's merge step on the CPU in a compiled C++ kernel that keeps the real tokens
            packed (float32 inference; the same merges, tokens equal to float rounding; built with
            the machine's C++ compiler and ninja on first use, about 40 s, cached). ``"auto"`` (the
            default): where it can (ATM's ``exact`` rule on a ViT without q/k norms, a CPU
            inference forward; where it cannot be built the batched step runs after one
            warning). Everything else runs the batched step, on any device.
        attention: ``"sdpa"`` (default) or ``"flex"``: the kernel that attends padded batches.
        **settings: the method's settings, e.g. ``r=8`` or ``alpha=1.0, beta=0.02, theta_min=0.86``.
    """
    merger = make_merger(method, **settings)
    return apply(model, merger, record_merges=record_merges, compile=compile, fused=fused, attention=attention)


@contextmanager
def unmerged(model: nn.Module) -> Iterator[nn.Module]:
    """Run a patched ``model`` as the dense model inside the ``with`` block (same weights, nothing
    merged), for comparisons; its policy and the record of its last forward are kept as they were."""
    if not isinstance(model, MIXINS):
        raise TypeError("unmerged needs a patched model: call atm_lightning.patch(model, ...) first")
    with running_dense(model._merging):
        yield model


def build_fused_step(model: nn.Module) -> bool:
    """Settle a patched ``model``'s ``fused="auto"`` now rather than in its first CPU forward:
    build the kernel (or warn and keep the batched step). A first build takes about a minute, which
    a timed forward must not include. Returns whether the fused step will be used."""
    if not isinstance(model, MIXINS):
        raise TypeError("build_fused_step needs a patched model: call atm_lightning.patch(model, ...) first")
    return kernel_ready(model._merging)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore timm's own model class (no hooks, no accounting)."""
    return remove(model)


__all__ = [
    "ATTENTION_KERNELS",
    "LayerRecord",
    "MergeStats",
    "MergeTrace",
    "UnsupportedModelError",
    "build_fused_step",
    "check_supported",
    "merge_stats",
    "patch",
    "unmerged",
    "unpatch",
]
