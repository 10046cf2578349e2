"""`atm benchmark` and the method options it shares, driven in-process on a few generated images and a small random ViT."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from atm_lightning import ATM, NoMerge, ToMe, merge_stats, patch
from atm_lightning.cli import main as atm_main
from atm_lightning.data.images import check_not_noise, evenly_spaced, image_paths, load_images
from atm_lightning.evaluation import benchmark, memory, timing
from atm_lightning.evaluation.options import parse_method
from atm_lightning.merge.fused import missing_build_tool
from tests.helpers import usage_error

MODEL = "vit_tiny_patch16_224"  # its name sets the eval transform (224 px); small_vit shrinks the net
ATM_SPEC = "atm:alpha=1.0,beta=0.03,theta_min=0.7,split_layer=4"

pytestmark = pytest.mark.usefixtures("restore_threads")  # main() sets torch's thread count


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    return usage_error(benchmark.build_parser(), benchmark.main, argv, capsys)


@pytest.mark.parametrize(
    ("spec", "cls", "expected"),
    [
        ("dense", NoMerge, {}),
        ("tome:r=13", ToMe, {"r": 13}),
        ("tome:r=[1,2,3],prop_attn=false", ToMe, {"r": [1, 2, 3], "prop_attn": False}),
        (
            "atm:alpha=1.0,beta=0.03,theta_min=0.7,split_layer=10",
            ATM,
            {"alpha": 1.0, "beta": 0.03, "theta_min": 0.7, "split_layer": 10, "batch_rule": "exact"},
        ),
        ("ATM:batch_rule=min", ATM, {"batch_rule": "min", "alpha": 1.0}),
    ],
)
def test_parse_method_reads_inline_specs(spec: str, cls: type, expected: dict) -> None:
    method = parse_method(spec)
    assert type(method.merger) is cls
    assert method.label == spec
    params = method.merger.params()
    assert {key: params[key] for key in expected} == expected


def test_parse_method_reads_the_execution_options() -> None:
    assert parse_method("atm:theta_min=0.8").attention == "sdpa"
    method = parse_method("atm:theta_min=0.8,attention=flex,fused=false,compile=true")
    assert method.attention == "flex" and method.fused is False and method.compile is True
    assert method.merger.theta_min == 0.8 and parse_method("tome:r=2").compile is False
    assert parse_method("evit:keep_rate=0.7").merger.keep_rate == 0.7


def test_parse_method_reads_the_merger_of_a_project_config(tmp_path: Path) -> None:
    config = tmp_path / "vit_t_atm.yaml"
    config.write_text(
        "model:\n  model_name: vit_tiny_patch16_224\n  merger:\n    class_path: atm_lightning.merge.ATM\n"
        "    init_args:\n      alpha: 0.98\n      beta: 0.02\n      theta_min: 0.86\n      split_layer: 9\n"
    )
    method = parse_method(str(config))
    assert method.label == "vit_t_atm"
    assert isinstance(method.merger, ATM)
    assert (method.merger.alpha, method.merger.theta_min, method.merger.split_layer) == (0.98, 0.86, 9)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tame:r=3", "unknown method 'tame'"),
        ("tome:r", "write settings as KEY=VALUE"),
        ("tome:q=1", "Valid settings: ['r', 'prop_attn', 'rerun_margin', 'last_block_prefix_only', 'trace_source']"),
        ("tome:r=-1", "non-negative"),
        ("atm:alpha=0.5,theta_min=0.9", "must be >= theta_min"),
        ("atm:alpha=high", "finite number"),
        ("atm:attention=nested", "attention must be one of"),
        ("atm:compile=maybe", "compile must be true or false"),
    ],
)
def test_parse_method_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad settings|unknown method|KEY=VALUE") as err:
        parse_method(spec)
    assert message in str(err.value)


def test_parse_method_rejects_configs_without_a_merger(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_method(str(tmp_path / "missing.yaml"))
    config = tmp_path / "data_only.yaml"
    config.write_text("data:\n  batch_size: 8\n")
    with pytest.raises(ValueError, match="no model.merger.class_path"):
        parse_method(str(config))


def test_table_rows_and_ratios_match_merge_stats(
    tmp_path: Path, shapes_folder: Path, small_vit: Callable[[], nn.Module], capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "bench.json"
    output.write_text("an earlier benchmark\n")
    argv = [
        "--model", MODEL, "--random-init", "--data-root", str(shapes_folder), "--num-images", "4",
        "--batch-sizes", "2", "4", "--runs", "2", "--warmup", "1", "--threads", "1",
        "--methods", "tome:r=13", ATM_SPEC,
        "--output", str(output), "--malloc", "default",  # keep: would change this test process's allocator
    ]  # fmt: skip
    with pytest.raises(FileExistsError, match=rf"{output} already exists; pass --overwrite"):
        benchmark.cli(argv)  # was replaced silently
    assert output.read_text() == "an earlier benchmark\n"
    rows = benchmark.cli([*argv, "--overwrite"])
    printed = capsys.readouterr().out

    # dense is added first; one row per method and batch size, in that order
    assert [(r.method, r.batch_size) for r in rows] == [
        (m, b) for b in (2, 4) for m in ("dense", "tome:r=13", ATM_SPEC)
    ]
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table[0] == (
        "| method | merge step | batch | img/s | speed-up | GFLOPs | FLOPs ratio | realised | peak mem (MiB) |"
    )
    fused = "fused" if missing_build_tool() is None else "batched"  # ATM's default: fused="auto"
    assert [r.merge_step for r in rows[:3]] == ["-", "batched", fused]
    assert len(table) == 2 + len(rows)
    assert "peak mem: CPU resident set size" in printed

    # GFLOPs recomputed independently: same weights, same images, merge_stats per image
    images, _ = load_images(sorted(shapes_folder.iterdir()), MODEL)
    model = small_vit()
    expected = {}
    for label in ("tome:r=13", ATM_SPEC):
        patch(model, parse_method(label).merger)
        with torch.inference_mode():
            model(images)
        expected[label] = float(merge_stats(model).gflops.mean())
    dense = merge_stats(model).gflops_dense
    expected["dense"] = dense

    for row in rows:
        assert row.gflops == pytest.approx(expected[row.method], rel=1e-9)
        assert row.flops_ratio == pytest.approx(dense / expected[row.method], rel=1e-9)
        assert row.realised == pytest.approx(row.speedup / row.flops_ratio, rel=1e-12)
        assert row.realised_min <= row.realised * (1 + 1e-12) and row.realised * (1 - 1e-12) <= row.realised_max
        assert row.img_per_s > 0 and row.peak_mem_mb is not None and row.peak_mem_mb >= 0
    for row in rows[::3]:
        assert (row.method, row.speedup, row.flops_ratio, row.realised) == ("dense", 1.0, 1.0, 1.0)
    atm_ratio = next(r.flops_ratio for r in rows if r.method == ATM_SPEC)
    assert atm_ratio > 1.2  # the shapes merge, so the ratios above are not trivially 1

    written = json.loads(output.read_text())
    assert written["settings"]["num_images"] == 4
    assert [r["flops_ratio"] for r in written["rows"]] == [r.flops_ratio for r in rows]


def test_methods_take_turns_batch_by_batch(small_vit: Callable[[], nn.Module]) -> None:
    """Every batch runs under every method before the next batch, so drift hits all alike."""
    model = small_vit()
    seen: list[str] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(getattr(getattr(m, "_merging", None), "policy", NoMerge()).name))
    methods = [parse_method(spec) for spec in ("dense", "tome:r=13")]
    batches = list(torch.zeros(6, 3, 224, 224).split(2))
    seconds = timing.interleaved_runs(model, methods, batches, runs=2)
    assert seen == ["none", "tome"] * 6
    assert [len(s) for s in seconds] == [2, 2] and all(t > 0 for s in seconds for t in s)


def test_csv_output_has_one_line_per_row(tmp_path: Path) -> None:
    rows = [
        timing.Row("dense", 8, 100.0, 1.0, 1.25, 1.0, 1.0, 12.5),
        timing.Row("tome:r=13", 8, 150.0, 1.5, 0.73, 1.71, 0.877, None),
    ]
    path = tmp_path / "out" / "bench.csv"
    benchmark.write_rows(rows, path, settings={})
    with path.open() as file:
        read = list(csv.DictReader(file))
    assert [r["method"] for r in read] == ["dense", "tome:r=13"]
    assert read[1]["flops_ratio"] == "1.71" and read[1]["peak_mem_mb"] == ""


class Allocates64MiB(nn.Module):
    """Stands in for a forward pass whose activations need 64 MiB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations = torch.ones(16 * 2**20)  # float32: 64 MiB, every page written
        time.sleep(0.02)  # longer than the 1 ms sampling interval
        return activations.sum()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS sampling needs Linux /proc")
def test_cpu_peak_memory_reads_the_rise_of_each_pass() -> None:
    peaks = [memory.rss_peak_mb(lambda: Allocates64MiB()(torch.zeros(1))) for _ in range(2)]
    assert all(56 < peak < 80 for peak in peaks), peaks


def test_refuses_random_noise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = torch.randint(0, 256, (96, 96, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"noise{i}.png")
    argv = ["--random-init", "--data-root", str(tmp_path), "--num-images", "4", "--batch-sizes", "2"]
    message = cli_error(argv, capsys)
    assert "look like random noise" in message and "use real photos" in message


def test_accepts_real_photos_as_not_noise(shared_images: Path) -> None:
    paths = evenly_spaced(image_paths([shared_images]), 8)
    check_not_noise(paths)  # does not raise


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data-root", "/nonexistent/val"], "/nonexistent/val does not exist"),
        (["--batch-sizes", "0"], "--batch-sizes must all be >= 1, got [0]"),
        (
            ["--batch-sizes", "2", "8"],
            "batch sizes [8] exceed --num-images 4; lower them or raise --num-images",
        ),
        (["--num-images", "9", "--batch-sizes", "2"], "found only 4; lower --num-images"),
        (["--model", "vit_tinny_patch16_224"], "unknown timm model 'vit_tinny_patch16_224'"),
        (["--methods", "tome:r=x"], "ToMe r must be a non-negative integer"),
        (["--output", "bench.txt"], "must end in .csv or .json"),
    ],
)
def test_user_errors_name_the_fix(
    shapes_folder: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "--random-init",
        "--data-root",
        str(shapes_folder),
        "--num-images",
        "4",
        "--batch-sizes",
        "2",
        *extra,
    ]
    assert message in cli_error(argv, capsys)


def test_needs_a_weights_source(shapes_folder: Path, capsys: pytest.CaptureFixture) -> None:
    message = cli_error(["--data-root", str(shapes_folder)], capsys)
    assert "one of the arguments --weights --pretrained --random-init is required" in message


@pytest.mark.parametrize("command", ["benchmark", "compare"])
def test_atm_runs_the_tools_with_their_own_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        atm_main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: atm {command} ")


def test_end_to_end_times_the_decoding_loop(
    shapes_folder: Path, small_vit: Callable[[], nn.Module], capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """Whole passes with the validate defaults: workers and threads recorded, same FLOPs as cached images."""
    monkeypatch.setattr("atm_lightning.evaluation.benchmark.default_num_workers", lambda: 0)
    argv = [
        "--model", MODEL, "--random-init", "--data-root", str(shapes_folder), "--num-images", "4",
        "--batch-sizes", "2", "--runs", "2", "--methods", "tome:r=13", "--end-to-end",
    ]  # fmt: skip
    rows = benchmark.cli(argv)
    printed = capsys.readouterr().out
    assert "whole evaluation passes (decoding in 0 DataLoader workers" in printed
    assert f"{torch.get_num_threads()} threads" in printed
    assert [r.method for r in rows] == ["dense", "tome:r=13"]
    assert rows[1].flops_ratio > 1 and rows[1].img_per_s > 0 and rows[1].peak_mem_mb is None
    assert [r.merge_step for r in rows] == ["-", "batched"]  # ToMe has no fused step
    cached = benchmark.cli([*argv[:-1], "--runs", "1", "--warmup", "0", "--malloc", "default"])
    assert cached[1].gflops == pytest.approx(rows[1].gflops, rel=1e-12)
