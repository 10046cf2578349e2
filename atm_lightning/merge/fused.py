"""ATM's merge step as a single compiled function (CPU, float32, inference).

On a CPU the batched merge step's fifty-odd small ATen calls per block cost more in dispatch than
in arithmetic at small batches, and its padded batches compute padding that a packed batch does
not. ``fused_step.cpp`` does the same merges in loops over each image's tokens, the images in
parallel, leaving only the similarity product to ATen's matmul, and keeps the real tokens
packed; ``docs/speed.md`` has the measured margin that keeps it.

The same forwards attend in it too: a packed batch's attention runs per image and head in
parallel on each image's rows of the packed qkv (:func:`fused_packed_attention`).

It is built from source with the machine's C++ compiler and ninja on first use (about 40 s;
cached under ``$XDG_CACHE_HOME/atm_lightning`` or ``~/.cache/atm_lightning``, rebuilt when the
source, torch or Python change). It merges the same pairs as the batched step; merged tokens agree
to float rounding (the sums run in another order), so a pair whose effective similarity lies
within about 1e-6 of the threshold could go either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .policies import ATM, TokenMerger

SOURCE = Path(__file__).with_name("fused_step.cpp")
# OpenMP lets ATen's parallel_for (a header template) run a batch's images on every thread. Only
# on Linux, where torch's wheels use GCC's OpenMP too; elsewhere (e.g. Apple's clang has no
# -fopenmp) the images run one after the other, with the same results.
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
CFLAGS = ("-O3", "-fno-math-errno", *OPENMP)
LDFLAGS = OPENMP  # tuples: torch's builder appends its own flags to the lists it is given


def is_fused_mode(value: object) -> bool:
    """Whether ``value`` is a ``fused`` setting: True, False or ``"auto"``."""
    return isinstance(value, bool) or value == "auto"


def fusable(policy: TokenMerger) -> bool:
    """Whether the fused step implements ``policy``'s merge step: ATM's, with any of its options
    but ``batch_rule="min"`` (the fused step merges each image on its own)."""
    return type(policy) is ATM and policy.batch_rule == "exact"


def kernel_name() -> str:
    """The extension's name: changes with the source, the flags, torch and Python, so each gets its own build."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{CFLAGS} {LDFLAGS} {torch.__version__} {sys.version_info[:2]}".encode())
    return f"atm_fused_step_{digest.hexdigest()[:12]}"


def build_directory(name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "atm_lightning" / name


def missing_build_tool() -> str | None:
    """What the build needs and this machine lacks, with how to get it; None when nothing is missing."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler was found (install g++ or clang, or set CXX)"
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # not "no CUDA runtime found"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja, which torch builds extensions with, was not found (pip install ninja)"
    return None


def kernel_problem() -> str | None:
    """None when the kernel is loaded (building it if need be); otherwise why it cannot be."""
    try:
        load_kernel()  # cached once loaded
    except (RuntimeError, OSError, ImportError) as error:  # a missing tool, or a failed build
        return missing_build_tool() or f"building it failed: {str(error).strip().splitlines()[0]}"
    return None


@cache
def load_kernel() -> ModuleType:
    """The compiled extension, built on first use on this machine (needs a C++ compiler)."""
    missing = missing_build_tool()
    if missing is not None:
        raise RuntimeError(f"fused=True builds the fused merge step, but {missing}; or patch with fused=False")
    from torch.utils.cpp_extension import load

    name = kernel_name()
    directory = build_directory(name)
    if not (directory / f"{name}.so").exists():
        print(f"atm_lightning: compiling the fused merge step into {directory} (once, about 40 s)", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(directory)
    )


def fused_merge_batch(
    x: Tensor,
    count: Tensor,
    keys: Tensor,
    attention: Tensor | None,
    query: Tensor | None,
    scale: float,
    size: Tensor | None,
    num_protected: int,
    policy: ATM,
    layer: int,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """ATM's merge step (``layer``) for a batch whose images hold ``count`` [B] tokens each, packed
    one after the other in ``x`` ([T, C], or [B, N, C] when none is padded); None when no image merges.

    ``keys`` [B, H, W, d] per-head keys; the class token's attention (read when
    ``policy.attention_power`` > 0) is ``attention`` [B, W], or computed here from its ``query``
    [B, H, 1, d] at ``scale``; ``size`` [B, W] (None: all 1). Each image merges exactly as
    :func:`atm_lightning.merge.step.match_step` merges it. Returns the tokens packed [T', C] in
    input image order, their sizes [B, W'] (0 past each count) and the counts [B].
    """
    x = x.reshape(-1, x.shape[-1])
    size = None if size is None else size.contiguous()
    attention = None if attention is None else attention.contiguous()
    out = load_kernel().merge_batch(
        x if x.is_contiguous() else x.contiguous(), count, keys if keys.stride(-1) == 1 else keys.contiguous(),
        attention, query, scale, policy.prop_attn, size, num_protected, policy.keys == "per_head",
        policy.split_kind(layer) == "size", policy.size_weighted, policy.attention_power, policy.keep_norm,
        policy.threshold(layer),
    )  # fmt: skip
    return (out[0], out[1], out[2]) if out else None


def fused_packed_attention(
    qkv: Tensor, count: Tensor, bias: Tensor, heads: int, scale: float, per_head_keys: bool, class_attention: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention of packed tokens as :func:`atm_lightning.patch.attention.grouped_attention`
    computes it (without q/k norms), one image and head at a time in parallel, reading each
    image's rows where they are: no padded copies. ``qkv`` [T, 3*H*d] holds the images' ``count``
    [B] rows one after the other; ``bias`` [B, 1, 1, W] is the block's additive mask. Returns the
    mixed values [T, H*d], the keys ([B, H, W, d] per head, else [B, 1, W, d]; zero past each
    count) and with ``class_attention`` the class token's head-averaged attention [B, W]."""
    out = load_kernel().packed_attention(
        qkv if qkv.is_contiguous() else qkv.contiguous(), count, bias[:, 0, 0], heads, scale, per_head_keys,
        class_attention,
    )
    return out[0], out[1], out[2] if class_attention else None
