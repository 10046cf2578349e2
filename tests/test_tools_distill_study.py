"""tools/distill_study.py end to end on a small random ViT: every stage runs, rows are written, a rerun skips them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml

from tests.fakedata import make_image_folder
from tests.helpers import CONFIGS, load_tool, save_weights

SMALL = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}


@pytest.mark.slow
def test_the_study_distils_evaluates_and_resumes(tmp_path: Path, capsys, restore_threads) -> None:
    study = load_tool("distill_study")
    make_image_folder(tmp_path / "images", ["cat", "dog", "fox"], per_class=4)
    torch.manual_seed(0)
    weights = save_weights(timm.create_model("vit_tiny_patch16_224", num_classes=3, **SMALL), tmp_path / "w.safetensors")
    config = yaml.safe_load((CONFIGS / "vit_t_dense.yaml").read_text())
    config["model"] |= {"num_classes": 3, "model_kwargs": SMALL}
    config["data"] |= {"img_size": 64, "batch_size": 4}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(config))
    argv = [
        str(tmp_path / "images"), str(weights), str(tmp_path / "out"), "--model-config", str(tmp_path / "small.yaml"),
        "--targets", "0.3", "--trainable", "norms_biases", "--num-images", "4", "--steps", "2", "--batch-size", "2",
        "--views", "as_is", "mirrored", "--recalibrate", "always", "--workers", "0", "--threads", "1",
    ]  # fmt: skip
    study.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["trainable"]) for r in rows] == [
        ("atm", "none"), ("tome", "none"), ("atm", "norms_biases"), ("tome", "norms_biases")
    ]
    distilled_atm = rows[2]
    assert distilled_atm["recalibrated"] and Path(distilled_atm["config"]).name == "recalibrated.yaml"
    assert distilled_atm["delta_kb"] > 0 and distilled_atm["minutes_distill"] > 0
    for row in rows:
        assert row["as_is"]["agreement"] is not None and row["mirrored"]["kl"] is not None
    assert len(list((tmp_path / "out" / "subsets" / "n4" / "train").glob("*/*"))) == 4
    capsys.readouterr()
    study.main(argv)  # everything done: nothing runs again
    assert not re.search(r"^--- ", capsys.readouterr().out, re.MULTILINE)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4


def test_the_table_adds_the_merged_pass_columns_where_measured() -> None:
    study = load_tool("distill_study")
    view = {"flops_reduction": 0.4, "agreement": 96.6, "kl": 0.0377, "top1_change": -1.2, "top1_change_ci95": [-2.8, 0.2]}
    base = {"method": "atm", "target": 0.4, "trainable": "none", "images": 0, "steps": 0, "lr": 0, "augment": "-", "temperature": 1}
    alone = {**view, "flops_reduction": 0.44, "agreement": 93.2}
    lines = study.table([{**base, "as_is": view, "as_is_merged_only": alone, "minutes_evaluate": 0.5}], ["as_is"]).splitlines()
    assert "as_is_merged_only: saved" in lines[0] and lines[1].count("---") == 11
    assert lines[2].endswith("| 40.0%, 96.6%, 0.0377, -1.2 [-2.8, +0.2] | 44.0%, 93.2%, 0.0377, -1.2 [-2.8, +0.2] | 0.5 |")
    assert "merged_only" not in study.table([{**base, "as_is": view}], ["as_is"])
