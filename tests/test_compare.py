"""`atm compare`: every row equals a single `atm validate` run; table, CSV and plot are written."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from unittest import mock

import pytest

from atm_lightning.cli import main as atm_main
from atm_lightning.evaluation import compare
from tests.helpers import CONFIGS

SMALL = {"img_size": 96, "depth": 6}
ATM_SPEC = "atm:alpha=1.0,beta=0.003,theta_min=0.99,split_layer=5"


@pytest.fixture(scope="module")
def weights(vit_weights) -> Path:
    return vit_weights(3, **SMALL)


def shared(weights: Path, root: Path) -> list[str]:
    """`atm validate` options common to compare's runs and the single reference run."""
    return [
        "--config", str(CONFIGS / "vit_t_dense.yaml"),
        "--model.weights", str(weights),
        "--model.num_classes", "3",
        "--model.model_kwargs", json.dumps(SMALL),
        "--data.img_size", "96",
        "--data.root", str(root),
        "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_root, weights) -> tuple[list, Path]:
    out = tmp_path_factory.mktemp("compare")
    args = [*shared(weights, data_root), "--tome_r", "8", "--atm", ATM_SPEC]
    args += ["--checkpoint", f"ft={weights}:tome:r=8", "--output", str(out)]
    return compare.cli(args), out


def test_rows_equal_single_validate_runs(tmp_path, monkeypatch, compared, data_root, weights) -> None:
    rows, _ = compared
    monkeypatch.chdir(tmp_path)
    with mock.patch("sys.argv", ["atm"]):
        atm_main(["validate", *shared(weights, data_root), "--model.merger", "ToMe", "--model.merger.r", "8"])
    (path,) = tmp_path.glob("runs/*/version_*/metrics.json")
    single = json.loads(path.read_text())
    by_name = {r.method: r for r in rows}
    for name in ("ToMe r=8", "ft"):  # the checkpoint row runs the same weights through --model.weights
        row = by_name[name]
        assert row.top1 == single["top1"] and row.top5 == single["top5"]
        assert row.gflops == single["gflops"]
        assert row.reduction_pct == 100 * single["flops_reduction"]
    assert single["flops_reduction"] > 0.2


def test_table_csv_and_plot_are_written(compared) -> None:
    rows, out = compared
    assert [r.method for r in rows] == ["dense", "ToMe r=8", "ATM", "ft"]
    assert [r.family for r in rows] == ["dense", "ToMe", "ATM", "checkpoint"]
    dense, tome, atm, _ = rows
    assert dense.reduction_pct == 0.0 and dense.agreement_pct == 100.0
    assert tome.reduction_pct > 20 and atm.reduction_pct > 5 and atm.params.startswith("alpha=1.0 beta=0.003")
    assert all(r.num_images == 8 and r.batch_size == 4 for r in rows)
    table = (out / "compare.md").read_text()
    assert "8 images, batch size 4" in table and "| ToMe r=8 | r=8 |" in table
    with (out / "compare.csv").open() as file:
        records = list(csv.DictReader(file))
    assert [r["method"] for r in records] == ["dense", "ToMe r=8", "ATM", "ft"]
    assert float(records[1]["gflops"]) == tome.gflops
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(out.glob("runs/*/version_*/metrics.json"))) == 4


def test_pareto_front() -> None:
    points = [(1.25, 80.0), (0.9, 80.0), (0.9, 79.0), (0.7, 75.0), (1.0, 81.0)]
    assert compare.pareto_front(points) == {1, 3, 4}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--oops", "1"], r"unknown option --oops"),
        (["--model.merger", "ToMe"], r"--model.merger is set per row by compare"),
        (["--checkpoint", "nopath"], r"write NAME=PATH\[:METHOD\]"),
        (["--checkpoint", "ft=/no/such.ckpt"], r"ft: /no/such.ckpt does not exist"),
    ],
)
def test_bad_options_name_the_fix(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        compare.cli(["--config", str(CONFIGS / "vit_t_dense.yaml"), "--no-plot", *argv])
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "/no/such.yaml"], r"--config /no/such.yaml does not exist"),
        (["--config", str(CONFIGS / "vit_t_dense.yaml"), "--data.batch_size", "abc"], r"data.batch_size"),
    ],
)
def test_atm_option_errors_come_as_one_short_error(argv, message, capsys, tmp_path) -> None:
    # The cause used to follow 67 lines of `atm validate` usage.
    with pytest.raises(SystemExit):
        compare.cli([*argv, "--data.root", str(tmp_path), "--no-plot", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert re.search(message, err.split("error:", 1)[1])
    assert len(err.splitlines()) <= 8 and "--data.crop_scale" not in err
