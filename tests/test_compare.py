"""`atm compare`: every row equals a single `atm validate` run; table, CSV and plot are written."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from safetensors.torch import load_file

from atm_lightning.cli import main as atm_main
from atm_lightning.delta import Delta, weights_sha256
from atm_lightning.evaluation import compare, plot
from atm_lightning.evaluation.row_configs import check_row_config
from atm_lightning.evaluation.tables import Row, pareto_front
from atm_lightning.merge import ATM, EViT, ToMe
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
def delta(tmp_path_factory, weights) -> Path:
    """A delta file on ``weights`` that moves the final norm, as a distillation would."""
    state = load_file(str(weights))
    moved = {"norm.bias": state["norm.bias"] + 0.5, "head.bias": state["head.bias"] + torch.tensor([0.0, 0.4, -0.4])}
    return Delta(weights_sha256(state), dense=moved).save(tmp_path_factory.mktemp("delta") / "delta.safetensors")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_root, weights, delta) -> tuple[list, Path]:
    out = tmp_path_factory.mktemp("compare")
    args = [*shared(weights, data_root), "--tome_r", "8", "--evit_keep", "0.7", "--evit_layers", "2", "4", "--atm", ATM_SPEC]
    args += ["--checkpoint", f"ft={weights}:tome:r=8", f"dist={delta}:tome:r=8", "--output", str(out)]
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


def test_a_distilled_row_is_the_delta_on_the_base_weights(tmp_path, monkeypatch, compared, data_root, weights, delta) -> None:
    """``--checkpoint NAME=DELTA:METHOD`` runs ``--model.delta DELTA`` on ``--model.weights``; its KL is
    against the base model, as a single validate with the delta reports it."""
    rows, _ = compared
    monkeypatch.chdir(tmp_path)
    with mock.patch("sys.argv", ["atm"]):
        atm_main(["validate", *shared(weights, data_root), "--model.merger", "ToMe", "--model.merger.r", "8", "--model.delta", str(delta)])
    (path,) = tmp_path.glob("runs/*/version_*/metrics.json")
    single = json.loads(path.read_text())
    row, tome = {r.method: r for r in rows}["dist"], {r.method: r for r in rows}["ToMe r=8"]
    assert (row.family, row.params) == ("distilled", "r=8 (delta.safetensors)")
    assert (row.top1, row.top5, row.kl, row.gflops) == (single["top1"], single["top5"], single["kl"], single["gflops"])
    assert row.kl != tome.kl  # the delta moved the outputs


def test_table_csv_and_plot_are_written(compared) -> None:
    rows, out = compared
    assert [r.method for r in rows] == ["dense", "ToMe r=8", "EViT keep=0.7", "ATM", "ft", "dist"]
    assert [r.family for r in rows] == ["dense", "ToMe", "EViT", "ATM", "checkpoint", "distilled"]
    dense, tome, evit, atm, _, _ = rows
    assert dense.reduction_pct == 0.0 and dense.agreement_pct == 100.0
    assert (dense.top1_change, dense.ci_low, dense.ci_high, dense.kl, dense.lossless) == (0.0, 0.0, 0.0, 0.0, True)
    for row in rows[1:]:
        assert row.top1_change == pytest.approx(row.top1 - dense.top1, abs=1e-9)
        assert row.ci_low <= row.top1_change <= row.ci_high and row.lossless == (row.ci_low <= 0 <= row.ci_high)
    assert tome.kl > 0 and evit.kl > 0 and evit.reduction_pct > 10
    assert tome.reduction_pct > 20 and atm.reduction_pct > 5 and atm.params.startswith("alpha=1.0 beta=0.003")
    assert all(r.num_images == 8 and r.batch_size == 4 for r in rows)
    table = (out / "compare.md").read_text()
    assert "8 images, batch size 4" in table and "| ToMe r=8 | r=8 |" in table
    with (out / "compare.csv").open() as file:
        records = list(csv.DictReader(file))
    assert [r["method"] for r in records] == ["dense", "ToMe r=8", "EViT keep=0.7", "ATM", "ft", "dist"]
    assert float(records[1]["kl"]) == tome.kl and records[1]["ci_low"] == str(tome.ci_low)
    assert float(records[1]["gflops"]) == tome.gflops
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(out.glob("runs/*/version_*/metrics.json"))) == 6


def evaluated(predictions: list[int], targets: list[int]) -> compare.Evaluated:
    return compare.Evaluated({}, torch.tensor(predictions), torch.tensor(targets), 1, Path("m.json"))


def test_against_dense_counts_lost_and_gained_images() -> None:
    dense = evaluated([0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 1, 1])  # 4 of 6 right
    merged = evaluated([0, 1, 9, 9, 1, 0], [0, 1, 2, 3, 1, 1])  # loses 2, gains 1
    got = compare.against_dense(merged, dense)
    assert got["agreement_pct"] == pytest.approx(100 * 3 / 6)
    assert got["top1_change"] == pytest.approx(100 * (1 - 2) / 6)
    assert got["ci_low"] < got["top1_change"] < got["ci_high"] and got["lossless"]
    other_order = evaluated([0, 1, 9, 9, 1, 0], [1, 0, 2, 3, 1, 1])
    assert set(compare.against_dense(other_order, dense).values()) == {None}


def test_sweep_fills_in_the_sweeps_not_given() -> None:
    parser = compare.build_parser()
    runs = compare.plan(parser.parse_args(["--config", "c.yaml", "--sweep", "--tome_r", "8"]))
    assert [r.label for r in runs] == ["dense", "ToMe r=8"] + [f"EViT keep={k:g}" for k in compare.SWEEP_EVIT_KEEP]
    runs = compare.plan(parser.parse_args(["--config", "c.yaml"]))
    assert [r.label for r in runs] == ["dense", "ToMe r=4", "ToMe r=8", "ToMe r=13", "ToMe r=16"]
    runs = compare.plan(parser.parse_args(["--config", "c.yaml", "--sweep"]))
    assert sum(r.family == "ToMe" for r in runs) == len(compare.SWEEP_TOME_R)
    runs = compare.plan(parser.parse_args(["--config", "c.yaml", "--tome_r", "--atm", "tome:r=14,rerun_margin=0.07", "atm"]))
    assert [(r.label, r.family) for r in runs] == [("dense", "dense"), ("ToMe + rerun", "ToMe + rerun"), ("ATM", "ATM")]
    assert set(r.family for r in runs) <= set(plot.COLOURS)  # every curve has its colour


def test_pareto_front() -> None:
    points = [(1.25, 80.0), (0.9, 80.0), (0.9, 79.0), (0.7, 75.0), (1.0, 81.0)]
    assert pareto_front(points) == {1, 3, 4}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--oops", "1"], r"unknown option --oops"),
        (["--model.merger", "ToMe"], r"--model.merger is set per row by compare"),
        (["--checkpoint", "nopath"], r"write NAME=PATH\[:METHOD\]"),
        (["--checkpoint", "ft=/no/such.ckpt"], r"ft: /no/such.ckpt does not exist"),
    ],
)
def test_bad_options_name_the_fix(argv, message, tmp_path) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        compare.cli(["--config", str(CONFIGS / "vit_t_dense.yaml"), "--no-plot", "--output", str(tmp_path), *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "/no/such.yaml"], r"--config /no/such.yaml does not exist"),
        (["--config", str(CONFIGS / "vit_t_dense.yaml"), "--data.batch_size", "abc"], r"data.batch_size"),
    ],
)
def test_atm_option_errors_come_as_one_short_error(argv, message, capsys, tmp_path, monkeypatch) -> None:
    # The cause used to follow 67 lines of `atm validate` usage, then a traceback.
    monkeypatch.delenv("ATM_DEBUG")
    with pytest.raises(SystemExit) as exit_info:
        atm_main(["compare", *argv, "--data.root", str(tmp_path), "--no-plot", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ")
    assert re.search(message, err) and "Traceback" not in err
    assert len(err.splitlines()) <= 4 and "--data.crop_scale" not in err


def test_a_second_compare_into_the_same_folder_is_refused_before_any_run(compared, data_root, weights) -> None:
    _, out = compared
    before = {p: p.stat().st_mtime_ns for p in out.glob("compare.*")}
    args = [*shared(weights, data_root), "--tome_r", "8", "--output", str(out), "--no-plot"]
    with pytest.raises(FileExistsError, match=r"holds compare.md, compare.csv, compare.png of an earlier compare; pass --overwrite"):
        compare.cli(args)
    assert {p: p.stat().st_mtime_ns for p in out.glob("compare.*")} == before
    assert len(list(out.glob("runs/*/version_*"))) == 6  # nothing ran


def test_a_row_config_for_another_model_is_refused(data_root, weights, tmp_path) -> None:
    # Was: a row labelled deit_t_atm that ran ViT-Ti at ViT-Ti's crop, without a word.
    args = ["--config", str(CONFIGS / "vit_t.yaml"), "--atm", str(CONFIGS / "deit_t_atm.yaml"), "--no-plot"]
    message = r"deit_t_atm.yaml is made for .*: model deit_tiny_patch16_224 \(every row: vit_tiny_patch16_224\), crop_pct 0.875 \(every row: 0.9\)"
    with pytest.raises(ValueError, match=message):
        compare.cli([*args, "--data.root", str(data_root), "--output", str(tmp_path)])
    assert not list(tmp_path.iterdir())
    # Another crop is refused, unless every row gets the same one.
    row = yaml.safe_load((CONFIGS / "vit_t_atm_40.yaml").read_text())
    row["data"]["crop_pct"] = 1.0
    (tmp_path / "crop1.yaml").write_text(yaml.safe_dump(row))
    base = str(CONFIGS / "vit_t.yaml")
    with pytest.raises(ValueError, match=r"crop_pct 1.0 \(every row: 0.9\)"):
        check_row_config(str(tmp_path / "crop1.yaml"), base, [])
    check_row_config(str(tmp_path / "crop1.yaml"), base, ["--data.crop_pct", "1.0"])
    check_row_config(str(CONFIGS / "vit_t_atm_40.yaml") + ":fused=false", base, ["--model.weights", "W"])


def csv_rows(
    path: Path, rows: list[tuple[str, str, str, float, float]], images: int = 10, batch: int = 4, metrics: str = "x"
) -> Path:
    """A compare.csv of (method, family, params, gflops, top1) rows."""
    from atm_lightning.evaluation.options import write_csv

    made = [
        Row(m, f, p, g, 100 * (1 - g / 2), t, 99.0, 95.0, t - 80.0, -1.0, 1.0, True, 0.01, 5.0, images, batch, False, metrics)
        for m, f, p, g, t in rows
    ]
    write_csv(made, path)
    return path


def test_merge_combines_runs_on_the_same_images(tmp_path) -> None:
    first = csv_rows(tmp_path / "a.csv", [("dense", "dense", "-", 2.0, 80.0), ("ToMe r=8", "ToMe", "r=8", 1.5, 79.0),
                                           ("atm_30", "ATM", "old", 1.4, 78.0)])
    second = csv_rows(tmp_path / "b.csv", [("dense", "dense", "-", 2.0, 80.0), ("atm_30", "ATM + rerun", "new", 1.4, 80.5),
                                            ("ToMe", "ToMe", "r=10 x", 1.3, 78.5), ("ToMe", "ToMe", "r=13 x", 1.2, 77.0)])
    rows = compare.cli(["--merge", str(first), str(second), "--output", str(tmp_path / "out"), "--no-plot"])
    assert [(r.method, r.params) for r in rows] == [
        ("dense", "-"), ("ToMe r=8", "r=8"), ("atm_30", "new"), ("ToMe", "r=10 x"), ("ToMe", "r=13 x")
    ]  # the later atm_30 replaced the earlier; inline rows kept apart by their params
    assert [r.pareto for r in rows] == [False, False, True, True, True]
    assert rows[2].agreement_pct == 95.0 and rows[2].lossless is True and rows[2].num_images == 10
    written = (tmp_path / "out" / "compare.csv").read_text().splitlines()
    assert len(written) == 6 and (tmp_path / "out" / "compare.md").is_file()


def test_merge_refuses_runs_on_other_images_naming_each_file(tmp_path) -> None:
    first = csv_rows(tmp_path / "a.csv", [("dense", "dense", "-", 2.0, 80.0)])
    other = csv_rows(tmp_path / "b.csv", [("dense", "dense", "-", 2.0, 81.0)], images=12)
    out = ["--no-plot", "--output", str(tmp_path / "out")]
    message = rf"same images .* but {first}: 10 images, dense top-1 80.00%; {other}: 12 images, dense top-1 81.00%"
    with pytest.raises(ValueError, match=message):
        compare.cli(["--merge", str(first), str(other), *out])
    fewer = csv_rows(tmp_path / "c.csv", [("ToMe r=8", "ToMe", "r=8", 1.5, 79.0)], images=8)
    with pytest.raises(ValueError, match=rf"{first}: 10 images, dense top-1 80.00%; also ToMe r=8 in {fewer} \(8 images\)"):
        compare.cli(["--merge", str(first), str(fewer), *out])
    with pytest.raises(ValueError, match=r"--merge needs a dense row"):
        compare.cli(["--merge", str(fewer), *out])


def test_merge_refuses_runs_made_another_way(tmp_path) -> None:
    dense = [("dense", "dense", "-", 2.0, 80.0)]
    out = ["--no-plot", "--output", str(tmp_path / "out")]
    first = csv_rows(tmp_path / "a.csv", [*dense, ("ToMe r=8", "ToMe", "r=8", 1.5, 79.0)])
    at_batch_1 = csv_rows(tmp_path / "b.csv", [*dense, ("atm_30", "ATM", "-", 1.4, 79.5)], batch=1)
    with pytest.raises(ValueError, match=re.escape("differ in batch_size 1 (dense), 4 (ToMe r=8)")):  # the later dense row
        compare.cli(["--merge", str(first), str(at_batch_1), *out])
    for name, interpolation in (("bicubic", "bicubic"), ("bilinear", "bilinear")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"model": "m", "interpolation": interpolation}))
    bicubic = csv_rows(tmp_path / "c.csv", dense, metrics=str(tmp_path / "bicubic.json"))
    bilinear = csv_rows(tmp_path / "d.csv", [("atm_30", "ATM", "-", 1.4, 79.5)], metrics=str(tmp_path / "bilinear.json"))
    with pytest.raises(ValueError, match=re.escape('differ in interpolation "bicubic" (dense), "bilinear" (atm_30)')):
        compare.cli(["--merge", str(bicubic), str(bilinear), *out])


def test_params_show_a_batch_rule_other_than_exact() -> None:
    assert "batch_rule=min" in compare.describe(compare.Run("atm", "ATM", ATM(batch_rule="min")))
    assert "batch_rule" not in compare.describe(compare.Run("atm", "ATM", ATM()))


def test_params_show_proportional_attention_only_against_the_methods_own_default() -> None:
    assert "prop_attn" not in compare.describe(compare.Run("evit", "EViT", EViT()))
    assert "prop_attn=True" in compare.describe(compare.Run("evit", "EViT", EViT(prop_attn=True)))
    assert "prop_attn=False" in compare.describe(compare.Run("tome", "ToMe", ToMe(r=8, prop_attn=False)))
