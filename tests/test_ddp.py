"""Two CPU processes give exactly the one-device numbers: no padded images, same batches.

9 images in batches of 4 (4 + 4 + 1) over 2 ranks: a padding sampler would count 10 images, a
rank-strided one would change ATM's `min` batches. Never `strategy="ddp"` inside pytest: rank 1
would re-run the whole pytest command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file

from atm_lightning import ATM
from atm_lightning.callbacks import MergeStatsCallback
from atm_lightning.data import ImageNetDataModule
from atm_lightning.module import TokenMergingModule
from tests.fakedata import make_image_folder
from tests.helpers import CONFIGS

NAME = "vit_tiny_patch16_224"
KEYS = ("val/num_images", "val/top1", "val/top5", "val/loss", "val/gflops", "val/flops_reduction")


def validate(root: Path, **trainer_kwargs) -> dict[str, float]:
    torch.manual_seed(0)
    # batch_rule="min" makes each image's merging depend on its batch-mates.
    merger = ATM(alpha=0.9, beta=0.05, theta_min=0.5, split_layer=10, batch_rule="min")
    module = TokenMergingModule(NAME, num_classes=3, merger=merger)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MergeStatsCallback()],
        **trainer_kwargs,
    )
    dm = ImageNetDataModule(str(root), model_name=NAME, num_classes=3, batch_size=4, num_workers=0)
    trainer.validate(module, datamodule=dm)
    return {key: float(trainer.callback_metrics[key]) for key in KEYS}


def test_two_processes_match_one(data_root: Path) -> None:
    one = validate(data_root, devices=1)
    two = validate(data_root, devices=2, strategy="ddp_fork")
    assert one["val/num_images"] == two["val/num_images"] == 8
    assert one["val/flops_reduction"] > 0.05  # merging happened, so batch composition mattered
    assert two == one


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("atm") is None, reason="the atm console script is not installed")
def test_atm_validate_ddp_subprocess_matches_one_device(tmp_path: Path, data_root: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(
        {k: v.contiguous() for k, v in timm.create_model(NAME, num_classes=3).state_dict().items()},
        str(weights),
    )
    rows = []
    for devices in ("1", "2"):
        workdir = tmp_path / f"devices{devices}"
        workdir.mkdir()
        subprocess.run(
            [
                shutil.which("atm"),
                "validate",
                "--config",
                str(CONFIGS / "vit_t_atm.yaml"),
                "--model.weights",
                str(weights),
                "--model.num_classes",
                "3",
                "--data.root",
                str(data_root),
                "--data.batch_size",
                "4",
                "--data.num_workers",
                "0",
                "--model.merger.theta_min",
                "0.5",
                "--model.merger.alpha",
                "0.9",
                "--model.merger.batch_rule",
                "min",
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                devices,
                "--trainer.strategy",
                "ddp" if devices == "2" else "auto",
                "--trainer.enable_progress_bar",
                "false",
            ],
            cwd=workdir,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=sys.stderr,
        )
        (path,) = workdir.glob("runs/*/version_*/metrics.json")
        rows.append(json.loads(path.read_text()))
    one, two = rows
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["num_images"] == two["num_images"] == 8
    for key in ("top1", "top5", "gflops", "tokens_per_layer"):
        assert two[key] == one[key], key
    # 1 vs 2 threads per process reorders float32 sums inside matmuls.
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("atm") is None, reason="the atm console script is not installed")
def test_a_rank_failure_is_named_at_the_end_of_the_output(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_image_folder(root / "val", ["cat", "dog", "fox"], per_class=3)
    broken = sorted((root / "val").rglob("*.JPEG"))[5]  # in rank 1's batch (images 4-7 of 9)
    broken.write_bytes(b"not a JPEG")
    weights = tmp_path / "w.safetensors"
    model = timm.create_model(NAME, num_classes=3, img_size=96, depth=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    done = subprocess.run(
        [
            shutil.which("atm"), "validate", "--config", str(CONFIGS / "vit_t_dense.yaml"),
            "--model.weights", str(weights), "--model.num_classes", "3",
            "--model.model_kwargs", '{"img_size": 96, "depth": 2}', "--data.img_size", "96",
            "--data.root", str(root), "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.enable_progress_bar", "false",
        ],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-2:]
    tail = done.stderr[-2000:]
    assert last[0].startswith(f"rank 1 failed first: ValueError: cannot read image {broken}"), tail
    assert last[1].startswith("rank 0 failed: RuntimeError:")
