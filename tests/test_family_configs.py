"""The EVA-02 and SigLIP configs: `atm calibrate` finds an operating point on them and `atm validate`
reproduces it (random weights, small versions of the models; users calibrate real weights)."""

from __future__ import annotations

import json
import re
import shutil
from unittest import mock

import pytest
import timm
import torch
import yaml

from atm_lightning.cli import main
from tests.fakedata import make_image_folder
from tests.helpers import CONFIGS, save_weights

CLASSES = ["ant", "bee", "cat"]
SMALL = {
    "eva02_t_atm.yaml": {"img_size": 56, "depth": 4, "head_init_scale": 1.0},
    "siglip_b_atm.yaml": {"img_size": 64, "depth": 4, "embed_dim": 192, "num_heads": 3},
}


def run(*args: str) -> None:
    with mock.patch("sys.argv", ["atm"]):
        main(list(args))


@pytest.mark.slow  # 15-20 s each on 2 cores (Lightning runs for every evaluated point)
@pytest.mark.parametrize("config", sorted(SMALL))
def test_config_calibrates_and_validates(config, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    small = SMALL[config]
    base = yaml.safe_load((CONFIGS / config).read_text())
    assert "UNCALIBRATED" in (CONFIGS / config).read_text()
    torch.manual_seed(0)
    model = timm.create_model(base["model"]["model_name"], num_classes=len(CLASSES), **small)
    weights = save_weights(model, tmp_path / "weights.safetensors")
    make_image_folder(tmp_path / "data" / "train", CLASSES, per_class=3)
    shutil.copytree(tmp_path / "data" / "train", tmp_path / "data" / "val")
    output = tmp_path / "calibrated.yaml"
    run(
        "calibrate", "--config", str(CONFIGS / config),
        "--model.weights", str(weights), "--model.num_classes", str(len(CLASSES)),
        "--model.model_kwargs", json.dumps(small), "--data.img_size", str(small["img_size"]),
        "--data.root", str(tmp_path / "data"), "--data.batch_size", "5", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        "--target_reduction", "0.25", "--tolerance", "0.03", "--max_evals", "5", "--split_layers", "[3]",
        "--model.merger.init_args.split_layer", "4", "--output", str(output),
    )  # fmt: skip
    chosen = float(re.search(r"reduction ([\d.]+)%", capsys.readouterr().out.splitlines()[-2]).group(1))
    assert abs(chosen - 25.0) <= 3.0
    assert yaml.safe_load(output.read_text())["model"]["model_name"] == base["model"]["model_name"]
    run("validate", "--config", str(output), "--data.root", str(tmp_path / "data"))
    (metrics,) = tmp_path.glob("runs/*/version_*/metrics.json")
    row = json.loads(metrics.read_text())
    assert row["method"] == "atm" and 100 * row["flops_reduction"] == pytest.approx(chosen, abs=0.051)
