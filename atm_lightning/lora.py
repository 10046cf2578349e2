"""Low-rank adapters (LoRA) on a timm ViT's linear layers, as weight parametrizations.

An adapted layer's weight reads as ``W + (B @ A) * scale``, with ``W`` frozen and the factors
``A`` [rank, in] and ``B`` [out, rank] trained (``B`` starts at 0, so training starts from the
model as it was). A parametrization rather than a wrapper module, because the merging block loop
reads some weights directly (the class-token-only last block slices ``attn.qkv.weight``): every
reader of ``.weight`` sees the adapted weight, and inference on the folded weights costs what the
base model costs. The state dict then holds ``<layer>.parametrizations.weight.original`` and the
factors; :func:`fold_state_dict` turns it back into plain timm weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

LORA_TARGETS = ("attn.qkv", "mlp.fc1", "mlp.fc2")  # the layers of each block that get adapters
ORIGINAL = ".parametrizations.weight.original"  # state-dict suffix of an adapted layer's frozen weight
FACTORS = ".parametrizations.weight.0."  # ... and of its factors: lora_a, lora_b, scale


def low_rank_update(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
    """``weight + (lora_b @ lora_a) * scale``: the one expression training, checkpoints and
    delta files use, so a folded weight equals the adapted one bit for bit."""
    return weight + (lora_b @ lora_a) * scale


class LowRank(nn.Module):
    """The parametrization: adds the scaled product of two trained factors to the frozen weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear, and the LoRA paper's code
        self.register_buffer("scale", torch.tensor(alpha / rank))
        self.enabled = True  # off: the layer runs with its frozen weight (the base model, for a teacher)

    def forward(self, weight: Tensor) -> Tensor:
        return low_rank_update(weight, self.lora_a, self.lora_b, self.scale) if self.enabled else weight


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Give ``targets`` of every block of ``model`` an adapter of ``rank``; freeze their weights.

    Returns the adapted layers' names (e.g. ``blocks.0.attn.qkv``). Only the factors require
    gradients afterwards; the caller decides about the model's other parameters.
    """
    if rank < 1:
        raise ValueError(f"the LoRA rank must be >= 1 (e.g. 8), got {rank}")
    names = []
    for index, block in enumerate(model.blocks):
        for target in targets:
            layer = block.get_submodule(target)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"blocks.{index}.{target} is {type(layer).__name__}, not a Linear layer LoRA can adapt")
            if parametrize.is_parametrized(layer, "weight"):
                raise ValueError(f"blocks.{index}.{target} has an adapter already")
            adapter = LowRank(layer.out_features, layer.in_features, rank, alpha).to(layer.weight)
            parametrize.register_parametrization(layer, "weight", adapter)
            layer.parametrizations.weight.original.requires_grad_(False)
            names.append(f"blocks.{index}.{target}")
    return names


def fold_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with adapters as the plain one a timm model loads: each adapted weight folded
    (``<layer>.weight``), the factors gone. A state dict without adapters comes back as it is."""
    layers = [key.removesuffix(ORIGINAL) for key in state if key.endswith(ORIGINAL)]
    if not layers:
        return state
    folded = {key: value for key, value in state.items() if ".parametrizations.weight." not in key}
    for layer in layers:
        factors = [state[f"{layer}{FACTORS}{name}"] for name in ("lora_a", "lora_b", "scale")]
        folded[f"{layer}.weight"] = low_rank_update(state[f"{layer}{ORIGINAL}"], *factors)
    return folded
