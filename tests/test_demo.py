"""The offline demo (tools/demo.py --fast): digits -> atm fit -> atm calibrate -> atm compare."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import TOOLS, load_tool

digits_data = load_tool("digits_data")


def test_digits_are_written_on_a_blank_canvas(tmp_path) -> None:
    counts = digits_data.write_digits(tmp_path)
    assert counts == {"train": 1433, "val": 364}  # every 5th image of each digit: 1 in 5 of every class
    val_per_class = [len(list((tmp_path / "val" / str(d)).iterdir())) for d in range(10)]
    assert min(val_per_class) >= 35 and max(val_per_class) <= 37
    image = np.asarray(Image.open(min((tmp_path / "train" / "1").iterdir())))
    assert image.shape == (32, 32) and image.max() > 200
    patches = image.reshape(8, 4, 8, 4).swapaxes(1, 2).reshape(64, 16)
    assert (patches.max(1) == 0).sum() >= 48  # at least three quarters of the 4x4 patches are blank


def test_fast_demo_trains_and_atm_merges_the_background(tmp_path) -> None:
    """The script as `make demo` runs it, in its own process."""
    out = tmp_path / "demo"
    command = [sys.executable, str(TOOLS / "demo.py"), "--fast", "--output", str(out)]
    subprocess.run(command, cwd=tmp_path, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with (out / "compare" / "compare.csv").open() as file:
        rows = list(csv.DictReader(file))
    # Calibrated without reruns: a margin set on training images would rerun far more of val.
    assert [r["family"] for r in rows] == ["dense", "ToMe", "ToMe", "ATM", "checkpoint"]
    by_family = {r["family"]: r for r in rows}
    dense, atm, tome_ft = by_family["dense"], by_family["ATM"], by_family["checkpoint"]
    # The ToMe-fine-tuned model runs ToMe r=12, so it costs exactly what off-the-shelf r=12 costs.
    tome12 = next(r for r in rows if r["method"] == "ToMe r=12")
    assert tome_ft["method"] == "tome_ft_r12" and tome_ft["gflops"] == tome12["gflops"]
    assert float(tome_ft["top1"]) > 50
    assert float(dense["top1"]) > 50  # 10 classes: chance is 10 %
    assert dense["num_images"] == "364"
    # Calibrated on training images, measured on val: the blank background merges alike in both.
    assert abs(float(atm["reduction_pct"]) - 60) <= 3 and "rerun_margin" not in atm["params"]
    assert float(atm["agreement_pct"]) >= 97 and float(atm["top1"]) >= float(dense["top1"]) - 2
    assert (out / "compare" / "compare.png").is_file()
    assert (out / "digits_atm.yaml").read_text().startswith("# Calibrated by `atm calibrate`")
