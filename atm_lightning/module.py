"""The LightningModule: a timm ViT patched with a token merger, evaluated exactly across devices."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from .delta import apply_delta, weights_sha256
from .distill import (
    BaseWeights,
    Distillation,
    check_distillation,
    distillation_step,
    export_delta,
    prepare_student,
    seed_step,
)
from .merge import NoMerge, TokenMerger
from .metrics import EvalMetrics
from .models import create_model
from .patch import build_fused_step, merge_stats, patch, unmerged
from .prediction import batch_record
from .training import build_mixup, check_recipe, param_groups, scaled_lr, set_drop_path, train_criterion, warmup_cosine


class TokenMergingModule(LightningModule):
    """A timm Vision Transformer that merges tokens with a pluggable policy (ATM, ToMe or none).

    Evaluation reports top-1/top-5, mean GFLOPs per image (multiply-adds, from each image's real
    token counts), mean tokens per layer, forward throughput and, with ``fidelity``, how far the
    predictions moved from the unmerged model's. Results of the last epoch of each stage are kept
    in ``results["val"]`` / ``results["test"]`` as plain numbers (top-1/top-5 in %), and the top-1
    class and label of each image in ``predictions[stage]`` / ``targets[stage]`` (the images this
    process evaluated, in loader order).

    Args:
        model_name: timm architecture, e.g. ``deit_small_patch16_224``.
        pretrained: load timm's published weights (needs the network or a hub cache; offline,
            use ``weights``).
        weights: local weights file (``.safetensors``, ``.pth`` state dict, or an ``atm fit``
            checkpoint); use this, not ``--ckpt_path``, to evaluate a checkpoint.
        num_classes: classifier size; must equal the weights' (a random head would report chance
            accuracy as a result), unless ``new_head``.
        new_head: replace the weights' classifier with a new, untrained one of ``num_classes``
            outputs, to fine-tune to another label set (``fit`` only).
        merger: token-merging policy, e.g. ``ATM``, ``ToMe`` or ``NoMerge`` (dense, with FLOPs accounting).
        lr: AdamW base learning rate for ``fit``, at a global batch of ``lr_base_batch`` images.
        weight_decay: AdamW weight decay (never on norms, biases, position embedding, class token).
        label_smoothing: label smoothing of the training loss.
        warmup_steps: optimizer steps of linear warm-up before the cosine decay to 0.
        warmup_epochs: the warm-up in epochs instead (may be fractional); use one of the two.
        lr_base_batch: the peak lr is ``lr * global_batch / lr_base_batch`` (DeiT: 512), with
            global_batch = batch size x devices x gradient accumulation; None uses ``lr`` as is.
        mixup_alpha: timm Mixup alpha for training (DeiT: 0.8); 0 with ``cutmix_alpha`` 0 disables mixing.
        cutmix_alpha: timm CutMix alpha for training (DeiT: 1.0).
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 (DeiT: 0.1).
        model_kwargs: further timm constructor arguments, e.g. ``{img_size: 32, patch_size: 4,
            depth: 4}`` for a small ViT trained from scratch (set ``data.img_size`` to match).
        compile: run each block, its merge step included, through ``torch.compile`` (the first
            batches compile, see ``atm_lightning.patch``).
        fused: run ATM's merge step as one compiled C++ function on CPU at inference (built with
            the machine's C++ compiler and ninja on first use; same merges, less time; see
            ``atm_lightning.merge.fused``). ``auto`` (the default) does so where the kernel builds
            and keeps the batched step, with a warning, where it does not; ``true`` makes a
            missing compiler an error; GPU runs never build it.
        fidelity: also run the unmerged model on every evaluation batch and report how far merging
            moves its predictions (agreement, KL, top-1 change with a 95% paired-bootstrap
            interval; see ``fidelity.py``). Costs one dense forward per batch, left out of img/s.
            The reference is the base model: without ``delta`` and what ``distill`` trains.
        delta: a delta file written by ``atm fit`` with ``distill``, applied on top of the base
            weights (``weights`` or ``pretrained``); refused for other base weights (see ``delta.py``).
        distill: ``fit`` trains the merged model to give the unmerged base model's outputs
            (label-free self-distillation; settings in :class:`~atm_lightning.distill.Distillation`)
            and writes what changed as a delta file at the end.
    """

    def __init__(
        self,
        model_name: str = "deit_tiny_patch16_224",
        pretrained: bool = False,
        weights: str | None = None,
        num_classes: int = 1000,
        new_head: bool = False,
        merger: TokenMerger = NoMerge(),  # noqa: B008 - policies are plain immutable settings
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.1,
        warmup_steps: int = 0,
        warmup_epochs: float = 0.0,
        lr_base_batch: int | None = 512,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        compile: bool = False,
        fused: bool | Literal["auto"] = "auto",
        fidelity: bool = True,
        delta: str | None = None,
        distill: Distillation | None = None,
    ) -> None:
        super().__init__()
        check_recipe(lr, weight_decay, label_smoothing, warmup_steps, warmup_epochs)
        self.save_hyperparameters()
        self.merger = merger
        self.distill = distill
        if distill is not None:
            check_distillation(merger, new_head)
        model = create_model(model_name, pretrained, weights, num_classes, model_kwargs, new_head=new_head)
        self.base_sha256 = weights_sha256(model.state_dict()) if delta or distill else None
        base = apply_delta(model, delta, weights or f"timm's pretrained {model_name}") if delta else {}
        if distill is not None:
            state = model.state_dict()
            base = {name: base.get(name, state[name]) for name in [*base, *prepare_student(model, distill)]}
        self.base_weights = BaseWeights(base)
        model = set_drop_path(model, drop_path_rate)
        self.model = patch(model, merger, compile=compile, fused=fused)
        self.mixup = build_mixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes)
        self.criterion = train_criterion(self.mixup, label_smoothing)
        depth = len(self.model.blocks)
        self.val_metrics = EvalMetrics(num_classes, depth, fidelity)
        self.test_metrics = EvalMetrics(num_classes, depth, fidelity)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.results: dict[str, dict[str, Any]] = {}
        self.predictions: dict[str, Tensor] = {}
        self.merge_steps: Counter[str] = Counter()  # evaluation batches by how their merge steps ran
        self.targets: dict[str, Tensor] = {}

    def restore_merging(self) -> None:
        """Patch the model with the module's merger and execution options again, after a tool
        (calibration, the merge visualisation) patched it with something else for a while."""
        patch(self.model, self.merger, compile=self.hparams.compile, fused=self.hparams.fused)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.distill is not None:
            seed_step(self.trainer.global_step, batch_idx, self.trainer.global_rank)

    def on_fit_end(self) -> None:
        if self.distill is not None:
            export_delta(self, self.trainer)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.distill is not None:
            return distillation_step(self, batch)
        images, targets = batch
        if self.mixup is None:
            logits = self.model(images)
            self.train_top1(logits, targets)
            self.log("train/top1", self.train_top1, on_step=True, on_epoch=True)
        else:
            if len(images) % 2:
                raise ValueError(
                    f"mixup/cutmix pair each image with another of its batch, so the per-device batch "
                    f"must be even (got {len(images)}); set --data.batch_size to an even number"
                )
            # Mixed images have no single true label: no training accuracy.
            images, targets = self.mixup(images, targets)
            logits = self.model(images)
        loss = self.criterion(logits, targets)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_validation_start(self) -> None:
        self._settle_fused_step()

    def on_test_start(self) -> None:
        self._settle_fused_step()

    def on_predict_start(self) -> None:
        self._settle_fused_step()

    def _settle_fused_step(self) -> None:
        """With ``fused=auto`` on a CPU, build the fused merge step before the first timed batch
        (a first build takes about a minute, which img/s must not count)."""
        if self.device.type == "cpu" and self.merger.merges:
            build_fused_step(self.model)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics)

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: EvalMetrics) -> None:
        # Only local metric updates here: ranks may run different numbers of batches (exact
        # sharding), so any per-step collective would hang.
        images, targets = batch
        start = time.perf_counter()
        logits = self.model(images)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        seconds = time.perf_counter() - start
        stats = merge_stats(self.model)
        self.merge_steps["fused" if stats.fused else "batched"] += 1
        dense = self._dense_logits(images, logits)
        self._check_finite(logits, dense)
        metrics.update(logits, targets, seconds, stats, dense)

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor | None]:
        """One batch's per-image predictions, tokens and GFLOPs (see :mod:`atm_lightning.prediction`)."""
        images, labels, index = batch
        logits = self.model(images)
        stats = merge_stats(self.model)  # of this forward, before the unmerged one
        dense = self._dense_logits(images, logits)
        self._check_finite(logits, dense)
        return batch_record(logits, dense, stats, labels, index)

    def _check_finite(self, logits: Tensor, dense_logits: Tensor | None) -> None:
        """Refuse outputs holding NaN or inf: every number computed from them would be wrong, and
        agreement with an equally broken unmerged pass would look perfect."""
        for name, values in (("merged", logits), ("unmerged", dense_logits)):
            if values is None:
                continue
            bad = int((~torch.isfinite(values)).any(-1).sum())
            if bad:
                raise ValueError(
                    f"the model's {name} outputs hold NaN or inf for {bad} of {len(values)} images; check "
                    f"the weights (--model.weights {self.hparams.weights}) and, under --trainer.precision "
                    f"16-mixed, try 32-true or bf16-mixed"
                )

    def _dense_logits(self, images: Tensor, logits: Tensor) -> Tensor | None:
        """The unmerged model's logits for ``images``, for the fidelity report (None: not asked)."""
        if not self.hparams.fidelity:
            return None
        if not self.merger.merges and not self.base_weights.names:
            return logits  # the model already ran dense
        with unmerged(self.model):
            return self.base_weights(self.model, images)

    def _eval_epoch_end(self, stage: str, metrics: EvalMetrics) -> None:
        results, predictions, targets = metrics.compute()
        if self.trainer.sanity_checking:
            return  # a few batches only: not a result
        self.results[stage] = results
        self.predictions[stage] = predictions
        self.targets[stage] = targets
        for key in (
            "top1",
            "top5",
            "loss",
            "gflops",
            "gflops_dense",
            "flops_reduction",
            "rerun_fraction",
            "num_images",
            "img_per_s",
            "agreement",
            "kl",
            "top1_change",
        ):
            if results[key] is None:
                continue  # fidelity was not measured
            # Values are already global (torchmetrics synced the sums); max of identical values
            # keeps them bit-exact on every rank and avoids Lightning's unsynced-epoch warning.
            self.log(f"{stage}/{key}", float(results[key]), sync_dist=True, reduce_fx="max")

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError("the cosine schedule needs a finite run: set --trainer.max_epochs or --trainer.max_steps")
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()  # the batch size and epoch length are read off the loader
        if self.trainer.num_training_batches == 0:
            batch_size = getattr(self.trainer.train_dataloader, "batch_size", None)
            raise ValueError(
                f"no training batch: each device's share of the training images is smaller than "
                f"--data.batch_size {batch_size}, and a last partial batch is dropped; lower --data.batch_size"
            )
        hp = self.hparams
        lr = hp.lr if hp.lr_base_batch is None else scaled_lr(hp.lr, self._global_batch(), hp.lr_base_batch)
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=lr)
        warmup = hp.warmup_steps or round(hp.warmup_epochs * self._steps_per_epoch())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _global_batch(self) -> int:
        """Images per optimizer step over all devices, for the lr scaling rule."""
        batch_size = getattr(self.trainer.train_dataloader, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "cannot read the training batch size for lr scaling (the train dataloader has no "
                "batch_size); set --model.lr_base_batch null and give the peak lr as --model.lr"
            )
        return batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _steps_per_epoch(self) -> int:
        """Optimizer steps an epoch: a last, shorter accumulation also steps, as Lightning does."""
        return max(1, -(-self.trainer.num_training_batches // self.trainer.accumulate_grad_batches))
