"""Delta files: the tensors a distillation changed, applied on top of the base weights on load.

A distilled operating point ships as a small safetensors file beside its config instead of a
second copy of the model. It holds only what changed: a trained tensor's new value, or, for a
layer with a low-rank adapter, the two factors and their scale (``W + (B @ A) * scale``, see
:mod:`.lora`) when those are smaller than the weight, which they are for any rank below
``in * out / (in + out)`` (144 for ViT-Ti's qkv). Its metadata records the sha256 of the base
weights it was trained from, so it cannot be applied to other weights by mistake.

The hash covers the state dict's tensors (names, dtypes, shapes and bytes, in sorted name
order), not the file's bytes: a ``.safetensors`` file, a ``.pth`` of the same tensors and an
``atm fit`` checkpoint of them hash the same, while any changed value changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .lora import FACTORS, ORIGINAL, low_rank_update

FORMAT = "atm-lightning-delta/1"
LOW_RANK = (".lora_a", ".lora_b", ".lora_scale")  # a low-rank entry: <name>.lora_a, <name>.lora_b, <name>.lora_scale


def weights_sha256(state: dict[str, Tensor]) -> str:
    """sha256 of a state dict's tensors: every name, dtype, shape and byte, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Delta:
    """What a delta file holds: new values (``dense``), low-rank updates (``low_rank``: name ->
    factors A, B and scale) and the base weights' hash, with free-form training ``info``."""

    base_sha256: str
    dense: dict[str, Tensor] = field(default_factory=dict)
    low_rank: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The base tensors this delta changes."""
        return sorted([*self.dense, *self.low_rank])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.dense.items()}
        for name, factors in self.low_rank.items():
            for suffix, value in zip(LOW_RANK, factors, strict=True):
                tensors[name + suffix] = value.detach().cpu().contiguous()
        metadata = {"format": FORMAT, "base_sha256": self.base_sha256, "info": json.dumps(self.info, sort_keys=True)}
        save_file(tensors, str(path), metadata=metadata)
        return path


def is_delta_file(path: str | Path) -> bool:
    """Whether ``path`` is a delta file (its metadata says so; the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return (file.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False  # not a safetensors file: a checkpoint or .pth


def read_delta(path: str | Path) -> Delta:
    """A delta file, checked to be one (an ordinary weights file is refused with the fix)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"delta file not found: {path} (check --model.delta)")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a delta file written by atm fit (no '{FORMAT}' format in its metadata); "
            f"pass full weights as --model.weights and a delta as --model.delta"
        )
    delta = Delta(metadata["base_sha256"], info=json.loads(metadata.get("info", "{}")))
    for name, value in tensors.items():
        if name.endswith(LOW_RANK[0]):
            base = name.removesuffix(LOW_RANK[0])
            delta.low_rank[base] = tuple(tensors[base + suffix] for suffix in LOW_RANK)
        elif not name.endswith(LOW_RANK[1:]):
            delta.dense[name] = value
    return delta


def apply_delta(model: nn.Module, path: str | Path, source: str) -> dict[str, Tensor]:
    """Change ``model``'s weights (the base, described by ``source`` in errors) by the delta at
    ``path``; returns the base values of the tensors it changed (for comparisons with the base)."""
    delta = read_delta(path)
    state = model.state_dict()
    found = weights_sha256(state)
    if found != delta.base_sha256:
        made_from = delta.info.get("base_weights", "unknown weights")
        raise ValueError(
            f"the delta {path} was trained from other base weights ({made_from}, sha256 {delta.base_sha256}) "
            f"than {source} (sha256 {found}); pass those base weights as --model.weights, or drop --model.delta"
        )
    originals = {}
    for name in delta.names:
        if name not in state:
            raise ValueError(f"the delta {path} changes {name}, which the model does not have; it is for another architecture")
        base = state[name]
        if name in delta.dense:
            new = delta.dense[name].to(base)
        else:
            new = low_rank_update(base, *(t.to(base) for t in delta.low_rank[name]))
        if new.shape != base.shape:
            raise ValueError(f"the delta {path} gives {name} the shape {tuple(new.shape)}, the model has {tuple(base.shape)}")
        originals[name] = base.detach().clone()
        with torch.no_grad():
            base.copy_(new)
    return originals


def delta_of(state: dict[str, Tensor], reference: dict[str, Tensor], base_sha256: str, info: dict[str, Any]) -> Delta:
    """The delta between a trained model's ``state`` (adapters as parametrizations, see
    :mod:`.lora`) and the base values ``reference`` of every tensor training may have changed.

    An adapted layer whose frozen weight is its base one is stored as its factors when they are
    smaller than the weight; any other changed tensor as its new value. Unchanged tensors are left out.
    """
    delta = Delta(base_sha256, info=info)
    for name, base in reference.items():
        layer = name.removesuffix(".weight")
        if layer + ORIGINAL in state:
            original = state[layer + ORIGINAL]
            factors = tuple(state[f"{layer}{FACTORS}{key}"] for key in ("lora_a", "lora_b", "scale"))
            lora_a, lora_b = factors[0], factors[1]
            smaller = lora_a.numel() + lora_b.numel() < original.numel()
            if torch.equal(original, base.to(original)) and smaller:
                if bool(lora_b.any()):
                    delta.low_rank[name] = factors
                continue
            value = low_rank_update(original, *factors)
        else:
            value = state[name]
        if not torch.equal(value, base.to(value)):
            delta.dense[name] = value
    return delta
