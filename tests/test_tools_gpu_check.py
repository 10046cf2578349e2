"""tools/gpu_check.py, run here with --device cpu: the device matches the CPU, and every model,
method and batch size gets its speed and launch count."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import load_tool

gpu_check = load_tool("gpu_check")
pytestmark = pytest.mark.usefixtures("restore_threads")


def test_the_report_holds_the_agreement_speed_and_launches(shapes_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "report.md"
    argv = ["--device", "cpu", "--data-root", str(shapes_folder), "--models", "vit_tiny_patch16_224",
            "--methods", "dense", "tome:r=20", "--batch-sizes", "1", "2", "--num-images", "4", "--check-images", "4",
            "--warmup", "0", "--runs", "1", "--output", str(output)]  # fmt: skip
    report = gpu_check.main(gpu_check.build_parser().parse_args(argv))
    assert output.read_text() == report
    check = [line for line in report.splitlines() if line.startswith("| dense |") or line.startswith("| tome:r=20 |")]
    assert check == ["| dense | 100.0% | 0.00e+00 | - |", "| tome:r=20 | 100.0% | 0.00e+00 | 0 |"]
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| vit_tiny_patch16_224 |")]
    assert [(r[1], r[2]) for r in rows] == [("dense", "1"), ("tome:r=20", "1"), ("dense", "2"), ("tome:r=20", "2")]
    launches = {(r[1], r[2]): int(r[-1].rstrip(" |")) for r in rows}
    assert launches[("dense", "1")] == launches[("dense", "2")] < launches[("tome:r=20", "1")]


def test_batches_larger_than_the_images_are_refused(shapes_folder: Path) -> None:
    argv = ["--device", "cpu", "--data-root", str(shapes_folder), "--num-images", "4", "--batch-sizes", "8"]
    with pytest.raises(ValueError, match="at most --num-images"):
        gpu_check.main(gpu_check.build_parser().parse_args(argv))
