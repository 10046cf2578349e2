"""TokenMergingModule: evaluation numbers equal a direct computation, per stage, with exact counts."""

from __future__ import annotations

from pathlib import Path

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

from atm_lightning import NoMerge, ToMe, merge_stats, patch
from atm_lightning.data import ImageNetDataModule
from atm_lightning.metrics import EvalMetrics
from atm_lightning.module import TokenMergingModule
from atm_lightning.results import format_table

NAME = "vit_tiny_patch16_224"


def datamodule(root: Path, batch_size: int = 3) -> ImageNetDataModule:
    return ImageNetDataModule(str(root), model_name=NAME, num_classes=3, batch_size=batch_size, num_workers=0)


def trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )


def direct(module: TokenMergingModule, root: Path, merger) -> dict:
    """Accuracy, loss and tokens from a fresh timm model with the module's weights, without Lightning."""
    model = timm.create_model(NAME, num_classes=3)
    model.load_state_dict(module.model.state_dict())
    patch(model.eval(), merger)
    dm = datamodule(root)
    dm.setup("validate")
    logits, targets, tokens, gflops = [], [], [], []
    with torch.no_grad():
        for images, labels in dm.val_dataloader():
            logits.append(model(images))
            targets.append(labels)
            tokens.append(merge_stats(model).tokens)
            gflops.append(merge_stats(model).gflops)
    logits, targets = torch.cat(logits), torch.cat(targets)
    patch(model, NoMerge())
    with torch.no_grad():
        dense = torch.cat([model(images) for images, _ in dm.val_dataloader()])
    dense_right, right = dense.argmax(1) == targets, logits.argmax(1) == targets
    log_p, log_q = F.log_softmax(dense.double(), -1), F.log_softmax(logits.double(), -1)
    return {
        "agreement": 100 * (dense.argmax(1) == logits.argmax(1)).double().mean().item(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        "top1_dense": 100 * dense_right.double().mean().item(),
        "lost": int((dense_right & ~right).sum()),
        "gained": int((right & ~dense_right).sum()),
        "top1": 100 * (logits.argmax(1) == targets).double().mean().item(),
        "loss": F.cross_entropy(logits.double(), targets).item(),
        "tokens_per_layer": torch.cat(tokens).double().mean(0).tolist(),
        "gflops": torch.cat(gflops).double().mean().item(),
        "predictions": logits.argmax(1),
    }


def test_validate_matches_direct_computation(data_root: Path) -> None:
    torch.manual_seed(0)
    module = TokenMergingModule(NAME, num_classes=3, merger=ToMe(r=8))
    t = trainer()
    t.validate(module, datamodule=datamodule(data_root))
    got, want = module.results["val"], direct(module, data_root, ToMe(r=8))
    assert got["num_images"] == 8
    assert torch.equal(module.predictions["val"], want["predictions"])  # every image's class, in order
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)  # float32 logits
    assert got["top5"] == 100.0  # top-5 is capped at the 3 classes
    assert got["tokens_per_layer"] == [197 - 8 * i for i in range(13)]
    assert got["gflops_dense"] == pytest.approx(1.2536832 - 192 * 997 / 1e9, rel=1e-6)  # DeiT-T, 3-class head
    assert got["gflops"] == pytest.approx(want["gflops"], rel=1e-12)
    assert got["flops_reduction"] == pytest.approx(1 - want["gflops"] / got["gflops_dense"], rel=1e-6)
    assert got["gflops"] == pytest.approx(got["gflops_dense"] * (1 - got["flops_reduction"]), rel=1e-9)
    assert got["gflops_matching"] > 0
    assert got["img_per_s"] > 0
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    assert logged["val/top1"] == pytest.approx(got["top1"], rel=1e-6)
    assert logged["val/num_images"] == 8 and logged["val/rerun_fraction"] == got["rerun_fraction"] == 0.0
    # Fidelity: the same model unmerged on the same images, compared image by image.
    assert got["agreement"] == pytest.approx(want["agreement"], abs=1e-9)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-5, abs=1e-9)
    assert got["top1_dense"] == pytest.approx(want["top1_dense"], abs=1e-9)
    assert got["top1_change"] == pytest.approx(100 * (want["gained"] - want["lost"]) / 8, abs=1e-9)
    assert got["top1"] - got["top1_dense"] == pytest.approx(got["top1_change"], abs=1e-9)
    low, high = got["top1_change_ci95"]
    assert low <= got["top1_change"] <= high and got["lossless"] == (low <= 0 <= high)
    assert logged["val/agreement"] == pytest.approx(got["agreement"], rel=1e-6)


def test_val_and_test_keep_separate_results(data_root: Path) -> None:
    torch.manual_seed(0)
    module = TokenMergingModule(NAME, num_classes=3)
    dm = datamodule(data_root, batch_size=5)
    t = trainer()
    t.validate(module, datamodule=dm)
    t.test(module, datamodule=dm)
    val, test = module.results["val"], module.results["test"]
    assert val["num_images"] == test["num_images"] == 8  # metrics were reset between the stages
    assert val["top1"] == test["top1"] and val["loss"] == pytest.approx(test["loss"], rel=1e-12)
    assert val["flops_reduction"] == 0.0 and val["gflops_matching"] == 0.0
    assert val["tokens_per_layer"] == [197.0] * 13
    # The dense model is its own reference: nothing moved, and the interval says so exactly.
    assert (val["agreement"], val["kl"], val["top1_change"]) == (100.0, 0.0, 0.0)
    assert val["top1_change_ci95"] == [0.0, 0.0] and val["lossless"] is True
    assert val["top1_dense"] == val["top1"]


def test_fidelity_can_be_turned_off(data_root: Path, recwarn: pytest.WarningsRecorder) -> None:
    module = TokenMergingModule(NAME, num_classes=3, merger=ToMe(r=8), fidelity=False)
    calls = []
    module.model.register_forward_hook(lambda *_: calls.append(1))
    trainer().validate(module, datamodule=datamodule(data_root))
    results = module.results["val"]
    assert len(calls) == 3  # 8 images in batches of 3: one forward each, no dense reference
    assert all(results[key] is None for key in ("agreement", "kl", "top1_change", "top1_change_ci95", "lossless"))
    assert "not measured" in format_table({"agreement": results["agreement"]})
    # torchmetrics warned that the fidelity sums were computed before any update
    assert not [w for w in recwarn if "before the ``update``" in str(w.message)]


@pytest.mark.parametrize("merger", [NoMerge(), ToMe(r=8)])
def test_outputs_holding_nan_are_an_error(data_root: Path, merger) -> None:
    # Was: exit 0, loss nan and kl nan, yet lossless true and agreement 100%.
    module = TokenMergingModule(NAME, num_classes=3, merger=merger)
    with torch.no_grad():
        module.model.head.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"merged outputs hold NaN or inf for 8 of 8 images; check the weights"):
        trainer().validate(module, datamodule=datamodule(data_root, batch_size=8))
    assert "val" not in module.results


def test_dense_module_is_the_timm_model() -> None:
    torch.manual_seed(0)
    module = TokenMergingModule(NAME, num_classes=3).eval()
    plain = timm.create_model(NAME, num_classes=3).eval()
    plain.load_state_dict(module.model.state_dict())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(module(images), plain(images))
    assert isinstance(module.merger, NoMerge)


def test_training_step_learns_and_schedules_lr(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TokenMergingModule(NAME, num_classes=3, merger=ToMe(r=4), lr=1e-3, warmup_steps=2)
    before = module.model.head.weight.clone()
    t = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    t.fit(module, datamodule=datamodule(data_root, batch_size=3))
    assert not torch.equal(before, module.model.head.weight)
    # Warm-up over steps 0-1, then cosine decay reaching 0 after step 3.
    lrs = [group["lr"] for group in t.optimizers[0].param_groups]
    assert lrs[0] == pytest.approx(0.0, abs=1e-12)
    assert {"train/loss", "train/top1", "train/lr"} <= set(t.callback_metrics)


def eval_metrics(per_image_gflops: list[list[float]], dense: float) -> dict:
    metrics = EvalMetrics(num_classes=4, depth=2, fidelity=False)
    for gflops in per_image_gflops:
        b = len(gflops)
        stats = SimpleNamespace(
            gflops=torch.tensor(gflops, dtype=torch.float64),
            gflops_dense=dense,
            gflops_matching=torch.zeros(b, dtype=torch.float64),
            tokens=torch.full((b, 3), 5),
            rerun=torch.arange(b) == 0,  # the first image of each batch ran again unmerged
        )
        metrics.update(torch.randn(b, 4), torch.zeros(b, dtype=torch.long), 0.1, stats, None)
    results, predictions, _ = metrics.compute()
    assert len(predictions) == sum(map(len, per_image_gflops))
    return results


def test_dense_reduction_is_exactly_zero_and_merged_is_the_mean_saving() -> None:
    dense = 1_253_683_200 / 1e9  # ViT-Ti
    # 7 batches of 5 dense images: 1 - mean/dense came out as -2.2e-16, printed as "-0.0 %".
    results = eval_metrics([[dense] * 5] * 7, dense)
    assert results["flops_reduction"] == 0.0 and str(results["flops_reduction"]) == "0.0"
    assert "flops_reduction  0.0 %" in format_table({"flops_reduction": results["flops_reduction"]})
    merged = eval_metrics([[dense, 0.5 * dense], [0.75 * dense]], dense)
    assert merged["flops_reduction"] == pytest.approx(1 - merged["gflops"] / dense, abs=1e-15)
    assert merged["flops_reduction"] == pytest.approx(0.25)
    assert merged["rerun_fraction"] == pytest.approx(2 / 3) and results["rerun_fraction"] == pytest.approx(1 / 5)
