"""Label-free self-distillation: the merged model learns the dense model's outputs (``--model.distill``).

The teacher is the student's own base weights run unmerged (:func:`atm_lightning.patch.unmerged`),
frozen and in eval mode: no labels and no second checkpoint. The student is the same model with
merging on, trained in place with the exact batch rule, so it trains on the merges it is
evaluated with. Only a chosen set of tensors trains (``trainable``); their base values are kept
in :class:`BaseWeights`, which runs the teacher on the very module by substituting them. The loss is ``T^2 KL(teacher || student)`` at temperature ``T``
(Hinton et al. 2015), plus ``label_weight`` times cross-entropy on the images whose label is
known. At the end, ``atm fit`` writes what changed as a delta file (:mod:`.delta`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .callbacks import EMA
from .delta import delta_of
from .lora import LORA_TARGETS, add_lora
from .merge import ATM, TokenMerger
from .patch import unmerged

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from .module import TokenMergingModule

Trainable = Literal["all", "norms_biases", "lora", "lora+norms_biases"]
LORA_WEIGHTS = tuple(f"{target}.weight" for target in LORA_TARGETS)  # the weights adapters change


@dataclass(frozen=True)
class Distillation:
    """Settings of ``atm fit --model.distill.*`` (``--model.distill '{}'`` for the defaults).

    Args:
        temperature: softmax temperature of both outputs in the KL term (the loss is scaled by
            its square, so the gradient's size does not depend on it).
        label_weight: weight of cross-entropy on the labels of images whose label is known (0:
            labels unused; unlabelled folders work either way).
        trainable: what trains: ``all`` parameters; ``norms_biases`` (LayerNorm gains and
            biases and every other bias: 31.5k values of ViT-Ti's 5.7M); ``lora``
            (low-rank adapters on each block's qkv, fc1 and fc2, folded into the weights for
            export); or ``lora+norms_biases``.
        lora_rank: rank of the adapters.
        lora_alpha: the adapters add ``(B @ A) * lora_alpha / lora_rank`` to a weight.
        delta: where ``fit`` writes the delta file at its end; default ``delta.safetensors`` in
            the run's log folder.
    """

    temperature: float = 1.0
    label_weight: float = 0.0
    trainable: Trainable = "norms_biases"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    delta: str | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"--model.distill.temperature must be > 0 (1 to 4 is usual), got {self.temperature}")
        if not self.label_weight >= 0:
            raise ValueError(f"--model.distill.label_weight must be >= 0 (0: labels unused), got {self.label_weight}")
        if self.trainable not in Trainable.__args__:
            raise ValueError(f"--model.distill.trainable is one of {', '.join(Trainable.__args__)}, got {self.trainable!r}")
        if not (self.lora_rank >= 1 and self.lora_alpha > 0):
            raise ValueError(f"LoRA needs lora_rank >= 1 and lora_alpha > 0, got {self.lora_rank} and {self.lora_alpha}")


torch.serialization.add_safe_globals([Distillation])  # checkpoints keep it among the hyperparameters


def check_distillation(merger: TokenMerger, new_head: bool) -> None:
    """Refuse settings under which distillation cannot do what it promises, naming the fix."""
    if not merger.merges:
        raise ValueError(
            "distillation trains the merged model towards the unmerged one, so the merger must merge: "
            "give a merging --model.merger (e.g. --config configs/vit_t_atm_40.yaml)"
        )
    if isinstance(merger, ATM) and merger.batch_rule != "exact":
        raise ValueError(
            "with batch_rule min an image's merges depend on its batch-mates, so training batches would merge "
            "otherwise than evaluation does: set --model.merger.batch_rule exact"
        )
    if new_head:
        raise ValueError("the teacher is the weights' own classifier; a new head has none: drop --model.new_head")


def trainable_names(model: nn.Module, trainable: Trainable) -> list[str]:
    """The base tensors (timm names) that training with ``trainable`` may change."""
    if trainable == "all":
        return [name for name, _ in model.named_parameters()]
    names = []
    if "lora" in trainable:
        names += [f"blocks.{i}.{target}.weight" for i in range(len(model.blocks)) for target in LORA_TARGETS]
    if "norms_biases" in trainable:
        norms = {name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)}
        names += [
            name for name, _ in model.named_parameters()
            if name.endswith(".bias") or name.rsplit(".", 1)[0] in norms
        ]  # fmt: skip
    return names


def prepare_student(model: nn.Module, settings: Distillation) -> list[str]:
    """Freeze ``model`` but for what ``settings.trainable`` trains, adding adapters for LoRA.
    Returns the base tensors training may change."""
    names = trainable_names(model, settings.trainable)
    model.requires_grad_(False)
    if "lora" in settings.trainable:
        add_lora(model, settings.lora_rank, settings.lora_alpha)  # new factors require gradients
    dense = names if settings.trainable == "all" else [n for n in names if not n.endswith(LORA_WEIGHTS)]
    for name in dense:
        model.get_parameter(name).requires_grad_(True)
    return names



class BaseWeights(nn.Module):
    """Base values of the tensors a delta or training changed, to run the base model on the same
    module: the teacher, and the reference of the fidelity report. Kept as buffers that move
    with the module and are never saved (they are the base weights the run was started from)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for index, tensor in enumerate(tensors.values()):
            self.register_buffer(f"base{index}", tensor.detach().clone(), persistent=False)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"base{index}") for index, name in enumerate(self.names)}

    def forward(self, model: nn.Module, images: Tensor) -> Tensor:
        """``model(images)`` with the base values in place of the changed ones (no graph)."""
        with torch.no_grad(), self.substituted(model):
            return model(images)

    @contextmanager
    def substituted(self, model: nn.Module) -> Iterator[None]:
        """Inside the block ``model`` holds the base values: each changed tensor's storage is
        swapped for its base value's (adapters switched off), and swapped back after."""
        swapped: list[tuple[Tensor, Tensor]] = []
        adapters: list[nn.Module] = []
        try:
            for name, base in self.tensors().items():
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                if parametrize.is_parametrized(module, attr):
                    adapters += list(module.parametrizations[attr])
                    target = module.parametrizations[attr].original
                else:
                    target = getattr(module, attr)
                swapped.append((target, target.data))
                target.data = base
            for adapter in adapters:
                adapter.enabled = False
            yield
        finally:
            for target, value in reversed(swapped):
                target.data = value
            for adapter in adapters:
                adapter.enabled = True


def teacher_logits(module: TokenMergingModule, images: Tensor) -> Tensor:
    """The dense base model's logits: unmerged, base weights, eval mode (no dropout), no graph."""
    model = module.model
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), unmerged(model):
            return module.base_weights(model, images)
    finally:
        model.train(training)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over images."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2


def distillation_step(module: TokenMergingModule, batch: tuple[Tensor, Tensor]) -> Tensor:
    """One training step of ``module`` in distillation mode; logs loss, KL, agreement and lr."""
    settings: Distillation = module.distill
    images, targets = batch
    known = targets >= 0
    soft_targets = None
    if module.mixup is not None:
        if len(images) % 2:
            raise ValueError(
                f"mixup/cutmix pair each image with another of its batch, so the per-device batch "
                f"must be even (got {len(images)}); set --data.batch_size to an even number"
            )
        images, soft_targets = module.mixup(images, targets.clamp(min=0))
        known = known.all().expand_as(known)  # a mixed image's label is known if both parts' are
    teacher = teacher_logits(module, images)
    student = module.model(images)
    kl = distillation_loss(student, teacher, settings.temperature)
    loss = kl
    if settings.label_weight > 0 and bool(known.any()):
        if soft_targets is not None:
            loss = loss + settings.label_weight * module.criterion(student, soft_targets)
        else:
            loss = loss + settings.label_weight * module.criterion(student[known], targets[known])
    agreement = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    module.log("train/loss", loss, prog_bar=True, sync_dist=True)
    module.log("train/kl", kl, sync_dist=True)
    module.log("train/agreement", agreement, prog_bar=True, sync_dist=True)
    module.log("train/lr", module.trainer.optimizers[0].param_groups[0]["lr"])
    return loss


def seed_step(step: int, batch: int, rank: int) -> None:
    """Seed torch, Python and NumPy for one training batch of one rank (drop-path, mixup), so a
    run resumed from a checkpoint draws what an uninterrupted run drew."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    words = np.random.SeedSequence([seed, step, batch, rank]).generate_state(2)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    random.seed(int(words[0]))
    np.random.seed(int(words[1]))


def export_delta(module: TokenMergingModule, trainer: Trainer) -> Path | None:
    """Write what training changed as a delta file (the EMA weights with an EMA callback, as
    validation and checkpoints use them); rank 0 writes and returns its path."""
    folder = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank asks
    if not trainer.is_global_zero:
        return None
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA) and cb.ema is not None), None)
    state = ema.ema if ema is not None else module.model.state_dict()
    settings: Distillation = module.distill
    hp = module.hparams
    info: dict[str, Any] = {
        "base_weights": Path(hp.weights).name if hp.weights else "timm-pretrained",
        "model_name": hp.model_name,
        "merger": module.merger.params(),
        "steps": trainer.global_step,
        "trainable": settings.trainable,
        "temperature": settings.temperature,
        **({"lora_rank": settings.lora_rank, "lora_alpha": settings.lora_alpha} if "lora" in settings.trainable else {}),
    }
    delta = delta_of(state, module.base_weights.tensors(), module.base_sha256, info)
    path = delta.save(settings.delta or Path(folder) / "delta.safetensors").resolve()
    size = path.stat().st_size / 1024
    print(
        f"wrote {path} ({len(delta.names)} changed tensors, {size:.0f} KB); evaluate it with the run's "
        f"config and --model.weights as here plus --model.delta {path}"
    )
    return path
