"""The DeiT fine-tuning recipe as small pieces: lr scaling, warm-up + cosine, decay groups, mixup, loss.

Kept apart from the LightningModule so each rule can be tested on its own and read in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from torch import nn


def check_recipe(lr: float, weight_decay: float, label_smoothing: float, warmup_steps: int, warmup_epochs: float) -> None:
    """Refuse recipe settings outside their range before any step (a negative lr stopped in
    torch's optimizer, a label smoothing of 2 trained on nonsense targets)."""
    if not lr > 0:
        raise ValueError(f"--model.lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"--model.weight_decay must be >= 0, got {weight_decay}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--model.label_smoothing must be in [0, 1), got {label_smoothing}")
    if warmup_steps < 0 or warmup_epochs < 0:
        raise ValueError(f"the warm-up must be >= 0, got warmup_steps={warmup_steps}, warmup_epochs={warmup_epochs}")
    if warmup_steps and warmup_epochs:
        raise ValueError(
            f"give the warm-up in steps or in epochs, not both (warmup_steps={warmup_steps}, "
            f"warmup_epochs={warmup_epochs}); set the other to 0"
        )


def scaled_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """DeiT's linear scaling rule: ``base_lr * global_batch / base_batch``.

    Scaling keeps one config valid on 1 or 8 devices: the step size follows the images per step.
    """
    if base_batch < 1:
        raise ValueError(f"lr_base_batch must be >= 1 (DeiT uses 512) or None, got {base_batch}")
    return base_lr * global_batch / base_batch


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up to 1, then cosine decay to 0 at ``total_steps``.

    The warm-up never starts at 0 (step 0 already gets ``1 / (warmup + 1)``), so no step is wasted.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only, none on norms, biases, positions and special tokens.

    Decaying a LayerNorm gain or the position embedding towards 0 only hurts; timm and DeiT exempt
    every 1-d tensor and the names the model lists in ``no_weight_decay()``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name in skip or name.endswith(".bias")
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_mixup(mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm's batch Mixup/CutMix (DeiT: switch between them with probability 0.5), or None when both alphas are 0.

    Mixup also applies the label smoothing, so its targets are soft distributions.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got {mixup_alpha}, {cutmix_alpha}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def train_criterion(mixup: Mixup | None, label_smoothing: float) -> nn.Module:
    """Cross-entropy on mixup's soft targets, or on hard labels with label smoothing."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth rising linearly from 0 in the first block to ``rate`` in the last (DeiT/timm rule).

    Set after construction so that weights files and checkpoints load the same way whatever the
    rate (DropPath has no parameters); the rate only acts in training.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    rates = torch.linspace(0, rate, len(model.blocks)).tolist()
    for block, block_rate in zip(model.blocks, rates, strict=True):
        block.drop_path1 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
    return model
