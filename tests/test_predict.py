"""`atm predict`: one row per image with what the model computed for it, the same file on one
device and two."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from atm_lightning import ATM, ToMe, merge_stats, patch
from atm_lightning.cli import main
from atm_lightning.data import ImageNetDataModule
from atm_lightning.module import TokenMergingModule
from atm_lightning.patch import unmerged
from atm_lightning.prediction import COLUMNS, PredictionWriter
from tests.fakedata import make_image_folder
from tests.helpers import ATM_LENIENT, CONFIGS

NAME = "vit_tiny_patch16_224"
SMALL = {"img_size": 96, "depth": 4}
MERGER = {"r": 4, "rerun_margin": 0.02}  # on top of vit_t_tome.yaml's ToMe
ATM_SMALL = {**ATM_LENIENT, "split_layer": 3}


@pytest.fixture(scope="module")
def weights(vit_weights) -> Path:
    return vit_weights(3, **SMALL)


def predict_args(weights: Path, root: Path, *extra: str) -> list[str]:
    return [
        "predict", "--config", str(CONFIGS / "vit_t_tome.yaml"),
        "--model.weights", str(weights), "--model.num_classes", "3", "--model.model_kwargs", json.dumps(SMALL),
        "--data.img_size", "96", "--data.root", str(root), "--data.batch_size", "3", "--data.num_workers", "0",
        "--model.merger.r", str(MERGER["r"]), "--model.merger.rerun_margin", str(MERGER["rerun_margin"]),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


def run(*args: str) -> None:
    with mock.patch("sys.argv", ["atm"]):
        main(list(args))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def by_hand(weights: Path, root: Path) -> list[dict]:
    """Each image's merged and unmerged outputs and merge statistics from a timm model patched by
    hand, with the config's preprocessing and batches of 3."""
    config = yaml.safe_load((CONFIGS / "vit_t_tome.yaml").read_text())
    merger = ToMe(**{**config["model"]["merger"]["init_args"], **MERGER})
    model = timm.create_model(NAME, num_classes=3, **SMALL)
    model.load_state_dict(load_file(str(weights)))
    patch(model.eval(), merger)
    dm = ImageNetDataModule(str(root), model_name=NAME, num_classes=3, batch_size=3, num_workers=0, img_size=96,
                            crop_pct=config["data"]["crop_pct"], interpolation=config["data"]["interpolation"])  # fmt: skip
    dm.setup("validate")
    images = []
    with torch.no_grad():
        for x, labels in dm.val_dataloader():
            logits, stats = model(x), merge_stats(model)
            with unmerged(model):
                dense = model(x)
            for i in range(len(x)):
                images.append({"logits": logits[i], "dense": dense[i], "label": int(labels[i]),
                               "tokens": int(stats.final_tokens[i]), "gflops": float(stats.gflops[i]),
                               "rerun": bool(stats.rerun[i])})  # fmt: skip
    return [{"path": path, **image} for (path, _), image in zip(dm.val_dataset.samples, images, strict=True)]


def test_one_row_per_image_holds_what_the_model_computed(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    run(*predict_args(weights, data_root))
    (path,) = tmp_path.glob("runs/vit_t_tome/version_0/predictions.csv")
    rows = read_csv(path)
    assert list(rows[0]) == list(COLUMNS)
    want = by_hand(weights, data_root)
    assert [row["path"] for row in rows] == [str(image["path"]) for image in want]  # every image once, in order
    for row, image in zip(rows, want, strict=True):
        probs = image["logits"].double().softmax(-1)
        order = probs.argsort(descending=True).tolist()
        dense = image["dense"].double().softmax(-1)
        assert int(row["label"]) == image["label"] and row["top5"] == " ".join(map(str, order))  # 3 classes
        assert int(row["top1"]) == order[0]
        assert [float(p) for p in row["top5_prob"].split()] == pytest.approx(probs[order].tolist(), abs=1e-6)
        assert float(row["top2_gap"]) == pytest.approx(float(probs[order[0]] - probs[order[1]]), abs=1e-6)
        assert int(row["dense_top1"]) == int(dense.argmax()) and row["changed"] == str(int(dense.argmax()) != order[0])
        assert float(row["dense_top1_prob"]) == pytest.approx(float(dense.max()), abs=1e-6)
        assert int(row["tokens"]) == image["tokens"] and float(row["gflops"]) == round(image["gflops"], 6)
        assert row["rerun"] == str(image["rerun"])
    assert {row["rerun"] for row in rows} == {"True", "False"}  # the margin sends some images again
    assert 0 < min(int(row["tokens"]) for row in rows) < 37  # 36 patches and the class token, merged
    out = capsys.readouterr().out
    assert f"wrote 8 rows to {Path('runs/vit_t_tome/version_0/predictions.csv')}" in out
    assert "8 images: mean" in out and "on 8 labelled images" in out


def test_a_folder_of_photos_is_read_unlabelled_and_written_as_json_lines(tmp_path, monkeypatch, weights) -> None:
    monkeypatch.chdir(tmp_path)
    photos = make_image_folder(tmp_path / "photos" / "holiday", ["day1", "day2"], per_class=2).parent
    output = tmp_path / "p.jsonl"
    args = predict_args(weights, photos, "--data.predict_split", ".", "--output", str(output), "--model.fidelity", "false")
    run(*args)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [Path(r["path"]).name for r in records] == ["day1_0.JPEG", "day1_1.JPEG", "day2_0.JPEG", "day2_1.JPEG"]
    assert all(r["label"] is None and r["dense_top1"] is None and r["changed"] is None for r in records)
    assert all(len(r["top5"]) == 3 and sum(r["top5_prob"]) == pytest.approx(1.0, abs=1e-5) for r in records)
    with pytest.raises(FileExistsError, match=rf"{output} already exists; pass --overwrite true"):
        run(*args)
    run(*args, "--overwrite", "true")
    with pytest.raises(ValueError, match=r"--output p.txt must end in .csv or .jsonl"):
        run(*predict_args(weights, photos, "--data.predict_split", ".", "--output", "p.txt"))


def test_a_checkpoint_path_is_refused_as_in_validate(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(*predict_args(weights, data_root, "--ckpt_path", str(weights)))
    assert f"--model.weights {weights} instead" in capsys.readouterr().err


def predict_in_process(root: Path, output: Path, **trainer_kwargs) -> str:
    torch.manual_seed(0)
    # batch_rule="min" makes each image's merging depend on its batch-mates.
    merger = ATM(**ATM_SMALL, batch_rule="min")
    module = TokenMergingModule(NAME, num_classes=3, merger=merger, model_kwargs=SMALL, fused=False)
    dm = ImageNetDataModule(str(root), model_name=NAME, num_classes=3, batch_size=4, num_workers=0, img_size=96)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PredictionWriter(output)], **trainer_kwargs)  # fmt: skip
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return output.read_text()


@pytest.mark.slow
def test_two_processes_write_the_file_of_one(tmp_path) -> None:
    root = make_image_folder(tmp_path / "data" / "val", ["cat", "dog", "fox"], per_class=3).parent  # 9: 4 + 4 + 1
    one = predict_in_process(root, tmp_path / "one.csv", devices=1)
    two = predict_in_process(root, tmp_path / "two.csv", devices=2, strategy="ddp_fork")
    rows = list(csv.DictReader(one.splitlines()))
    assert len(rows) == 9 and len({row["path"] for row in rows}) == 9
    assert len({row["tokens"] for row in rows}) > 1  # merging happened, so batch composition mattered
    assert two == one


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("atm") is None, reason="the atm console script is not installed")
def test_atm_predict_on_two_processes_writes_the_file_of_one(tmp_path, weights) -> None:
    root = make_image_folder(tmp_path / "data" / "val", ["cat", "dog", "fox"], per_class=3).parent
    files = []
    for devices in ("1", "2"):
        output = tmp_path / f"devices{devices}.csv"
        strategy = ("--trainer.devices", devices, "--trainer.strategy", "ddp" if devices == "2" else "auto")
        args = predict_args(weights, root, *strategy, "--data.batch_size", "4", "--threads", "1", "--output", str(output))
        args += ["--model.merger", "ATM", *(f"--model.merger.{k}={v}" for k, v in ATM_SMALL.items())]
        args += ["--model.merger.batch_rule", "min", "--model.fused", "false"]
        subprocess.run([shutil.which("atm"), *args], cwd=tmp_path, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=sys.stderr)  # fmt: skip
        files.append(output.read_text())
    one, two = files
    assert len(one.splitlines()) == 10 and two == one
