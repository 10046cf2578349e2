"""Helpers the tests share: generated images as tensors and files, small ViTs, the tools/ scripts.

Fixtures built on these live in conftest.py; image folders on disk in fakedata.py.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOOLS = REPO / "tools"

SMALL_DEPTH = 4  # blocks of the ViT the small_vit fixture makes the commands build

# Randomly initialised ViTs have very similar keys, so thresholds sit close to 1 to merge a
# varied amount (about 40-90% of tokens gone by the end on blocky_images).
ATM_LENIENT = {"alpha": 1.0, "beta": 0.001, "theta_min": 0.995, "split_layer": 9}


def blocky_images(batch: int, seed: int = 0, size: int = 224) -> torch.Tensor:
    """Images with flat backgrounds and a few rectangles: many near-duplicate patches, varied per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(batch, 3, size, size)
    for i in range(batch):
        images[i] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        for _ in range(int(torch.randint(1, 2 + 3 * i, (1,), generator=g))):
            y0, x0 = torch.randint(0, size - 32, (2,), generator=g).tolist()
            h, w = torch.randint(16, 96, (2,), generator=g).tolist()
            images[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        images[i] += 0.05 * torch.randn(3, size, size, generator=g) * (i % 2)
    return images


def make_vit(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def draw_shapes(path: Path, num_rects: int, seed: int, size: int = 96) -> Path:
    """A flat background with ``num_rects`` solid rectangles: more rectangles, fewer merges."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(40, 216) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(num_rects):
        x, y = rng.randrange(size - 8), rng.randrange(size - 8)
        w, h = rng.randrange(4, size // 3), rng.randrange(4, size // 3)
        draw.rectangle((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
    image.save(path)
    return path


def load_tool(name: str) -> ModuleType:
    """A script of tools/ as a module (tools/ is not a package), e.g. ``load_tool("visualize")``."""
    module_name = f"tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def usage_error(parser, main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command expecting a usage error (exit code 2); return its message."""
    from atm_lightning.evaluation.options import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(parser, main, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode in torch 2.14 counts 0 for the CPU flash-attention op; count it like SDPA."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry or op.default in flop_registry:
        return {}

    def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_sdpa_flops}


def counted_macs(model: torch.nn.Module, images: torch.Tensor, merge_step: bool = False) -> int:
    """Multiply-adds of ``model(images)`` as torch's own op counter counts them: the model's own
    work (convolution, linear layers, attention), or with ``merge_step`` what the merge steps
    compute (similarities, the class token's attention, moving the tokens), counted apart.

    The parameters stop requiring gradients: the counter's module tracker fails on views of
    parameters made under no_grad (SigLIP's attention-pool latent)."""
    from atm_lightning.merge.step import Move
    from atm_lightning.patch import eva, loop, vit

    model.requires_grad_(False)
    step_flops = []

    def counted(function):
        def inside_step(*args, **kwargs):
            step_counter = FlopCounterMode(display=False)  # entering one resets it: one per call
            with step_counter:
                out = function(*args, **kwargs)
            step_flops.append(step_counter.get_total_flops())
            return out

        return inside_step

    steps = [(loop, "match_step"), (loop, "prune_step"), (Move, "apply"), (vit, "class_attention"),
             (eva, "class_attention")]  # fmt: skip
    originals = [getattr(module, name) for module, name in steps]
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    try:
        for (module, name), original in zip(steps, originals, strict=True):
            setattr(module, name, counted(original))
        with counter:
            model(images)
    finally:
        for (module, name), original in zip(steps, originals, strict=True):
            setattr(module, name, original)
    step = sum(step_flops)
    return (step if merge_step else counter.get_total_flops() - step) // 2
