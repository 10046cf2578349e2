"""The offline demo (tools/demo.py --fast): digits -> atm fit -> atm calibrate -> compare."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
demo = importlib.import_module("demo")
digits_data = importlib.import_module("digits_data")


pytestmark = pytest.mark.usefixtures("restore_threads")  # main() sets torch's thread count


def test_digits_are_written_on_a_blank_canvas(tmp_path) -> None:
    counts = digits_data.write_digits(tmp_path)
    assert counts == {"train": 1433, "val": 364}  # every 5th image of each digit: 1 in 5 of every class
    val_per_class = [len(list((tmp_path / "val" / str(d)).iterdir())) for d in range(10)]
    assert min(val_per_class) >= 35 and max(val_per_class) <= 37
    image = np.asarray(Image.open(min((tmp_path / "train" / "1").iterdir())))
    assert image.shape == (32, 32) and image.max() > 200
    patches = image.reshape(8, 4, 8, 4).swapaxes(1, 2).reshape(64, 16)
    assert (patches.max(1) == 0).sum() >= 48  # at least three quarters of the 4x4 patches are blank


def test_fast_demo_trains_and_atm_merges_the_background(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = demo.cli(["--fast", "--output", str(tmp_path / "demo")])
    by_family = {r.family: r for r in rows}
    assert [r.family for r in rows] == ["dense", "ToMe", "ToMe", "ATM", "checkpoint"]
    dense, atm, tome_ft = by_family["dense"], by_family["ATM"], by_family["checkpoint"]
    # The ToMe-fine-tuned model runs ToMe r=12, so it costs exactly what off-the-shelf r=12 costs.
    tome12 = next(r for r in rows if r.method == "ToMe r=12")
    assert tome_ft.method == "tome_ft_r12" and tome_ft.gflops == tome12.gflops
    assert tome_ft.top1 > 50
    assert dense.top1 > 50  # 10 classes: chance is 10 %
    assert dense.num_images == 364
    assert abs(atm.reduction_pct - 60) <= 1.5  # calibrated on training images, measured on val
    assert atm.agreement_pct >= 97 and atm.top1 >= dense.top1 - 2
    assert (tmp_path / "demo" / "compare" / "compare.png").is_file()
    assert (tmp_path / "demo" / "digits_atm.yaml").read_text().startswith("# Calibrated by `atm calibrate`")
