"""`atm calibrate`: the level search, and the real subcommand on generated images and a model it has never seen."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml

from atm_lightning.calibration.search import (
    LOG_GAP_BOUNDS,
    Calibration,
    Point,
    Shape,
    candidate_shapes,
    solve_level,
    unreached_message,
)
from atm_lightning.calibration import calibrate
from atm_lightning.calibration.run import draw_samples
from atm_lightning.calibration import command as calibration_command
from atm_lightning.calibration import run as calibration_run
from atm_lightning.cli import main
from atm_lightning.data import ImageNetDataModule
from atm_lightning.merge import ATM, NoMerge, ToMe
from atm_lightning.module import TokenMergingModule
from atm_lightning.threads import available_cpus
from tests.fakedata import make_image_folder
from tests.helpers import CONFIGS

NAME = "vit_tiny_patch16_224"
CLASSES = ["ant", "bee", "cat"]
NUM_CLASSES = 200  # a head no shipped config knows
# ViT-Ti's blocks at 96 px, 6 deep: 37 tokens, fast enough for the suite.
SMALL = {"img_size": 96, "depth": 6}


@pytest.fixture(scope="module")
def mirrored_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ hold the same 12 images, so the reduction found must reappear in validate."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "train", CLASSES, per_class=4)
    shutil.copytree(root / "train", root / "val")
    return root


@pytest.fixture(scope="module")
def weights(vit_weights) -> Path:
    path = vit_weights(NUM_CLASSES, **SMALL)
    others = [f"other{i}" for i in range(NUM_CLASSES - len(CLASSES))]  # the head's classes without images
    class_names(path).write_text("\n".join(CLASSES + others) + "\n")
    return path


def class_names(weights: Path) -> Path:
    """The class-index order of the head, beside its weights: three classes have folders."""
    return weights.with_suffix(".classes.txt")


def run(*args: str) -> None:
    with mock.patch("sys.argv", ["atm"]):
        main(list(args))


def common(weights: Path, root: Path) -> list[str]:
    return [
        "--model.model_name", NAME,
        "--model.weights", str(weights),
        "--model.num_classes", str(NUM_CLASSES),
        "--data.class_names", str(class_names(weights)),
        "--model.model_kwargs", json.dumps(SMALL),
        "--data.img_size", str(SMALL["img_size"]),
        "--data.root", str(root),
        "--data.batch_size", "5",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_calibrated_config_validates_at_the_reduction_found(tmp_path, monkeypatch, capsys, mirrored_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "sub" / "my_atm.yaml"
    output.parent.mkdir()
    output.write_text("# an earlier calibration\n")
    args = ["--target_reduction", "0.3", "--tolerance", "0.02", "--use_labels", "true", "--output", str(output)]
    command = ["calibrate", "--config", str(CONFIGS / "vit_t_dense.yaml"), *common(weights, mirrored_root), *args]
    with pytest.raises(FileExistsError, match=rf"{output} already exists; pass --overwrite true"):
        run(*command)  # before any image is read
    assert output.read_text() == "# an earlier calibration\n"
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:  # one worker feeds the dense pass only; the merged passes run from memory on every core
        run(*command, "--overwrite", "true", "--data.num_workers", "1")
        assert torch.get_num_threads() == available_cpus()
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    # --num_images defaults to 1000; the 12 training images are all there is, and that is said.
    assert f"--num_images 1000 asked for more images than the 12 in {mirrored_root / 'train'}" in captured.err
    lines = [line for line in captured.out.splitlines() if "KL" in line]
    chosen = float(re.search(r"reduction ([\d.]+)%", lines[-1]).group(1))
    assert lines[-1].startswith("chosen:") and len(lines) >= 3  # one line per evaluated point
    assert abs(chosen - 30.0) <= 2.0

    text = output.read_text()
    config = yaml.safe_load(text)
    assert text.startswith("# Calibrated by `atm calibrate`") and f"12 images of {mirrored_root / 'train'}" in text
    assert config["model"]["merger"]["class_path"] == "atm_lightning.merge.ATM"
    assert config["model"]["weights"] == str(weights) and config["model"]["num_classes"] == NUM_CLASSES
    assert "root" not in config["data"] and "target_reduction" not in config
    atm = ATM(**config["model"]["merger"]["init_args"])
    assert atm.theta_min < 1.0 and 0.0 < atm.rerun_margin < 1.0  # the default rerun fraction is on
    assert re.search(r"rerun_margin=[\d.e-]+: .* rerun [\d.]+%", lines[-1])
    assert re.search(r"\n# [\d.]+% of these images ran again; of images the model is less sure of, more will", text)
    assert "warning: the dense model gets" not in captured.err  # a random model is right on a third

    # The file is used as is; only the data root is new. val/ holds the calibration images.
    run("validate", "--config", str(output), "--data.root", str(mirrored_root))
    (metrics,) = tmp_path.glob("runs/*/version_*/metrics.json")
    row = json.loads(metrics.read_text())
    assert row["num_images"] == 12 and row["method"] == "atm"
    assert 100 * row["flops_reduction"] == pytest.approx(chosen, abs=0.051)


def test_missing_train_split_says_why_training_images(tmp_path, monkeypatch, weights) -> None:
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "only_val" / "val", CLASSES, per_class=1)
    with pytest.raises(FileNotFoundError, match=r"training images.*--data.train_split"):
        run("calibrate", "--config", str(CONFIGS / "vit_t_dense.yaml"), *common(weights, tmp_path / "only_val"))


def test_unreachable_target_names_the_reductions_seen(tmp_path, monkeypatch, mirrored_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--target_reduction", "0.99", "--max_evals", "3", "--split_layers", "[5]"]
    args += ["--alpha_drops", "[0.0]"]
    message = r"no schedule came within 1.0 pp of the target 99.0% \(reductions seen"
    with pytest.raises(RuntimeError, match=message) as error:
        run("calibrate", "--config", str(CONFIGS / "vit_t_dense.yaml"), *common(weights, mirrored_root), *args)
    # More evaluations or a wider tolerance cannot reach it, so the message must not suggest them.
    assert "even the strongest schedule (theta_min -1) saves only" in str(error.value)
    assert "--max_evals" not in str(error.value) and "--tolerance" not in str(error.value)


def test_a_folder_as_output_is_refused_before_the_search(tmp_path, monkeypatch, mirrored_root, weights) -> None:
    # Was: the whole search, then a raw IsADirectoryError, the chosen thresholds never shown.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    args = ["--output", "out", "--overwrite", "true"]
    with pytest.raises(IsADirectoryError, match=r"--output out is a folder; give a file name, e.g. --output out/calibrated.yaml"):
        run("calibrate", "--config", str(CONFIGS / "vit_t_dense.yaml"), *common(weights, mirrored_root), *args)


def test_the_chosen_point_is_shown_before_the_file_is_written(tmp_path, monkeypatch, capsys, mirrored_root, weights) -> None:
    def disk_full(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(calibration_command, "write_calibrated_config", disk_full)
    args = ["--target_reduction", "0.3", "--tolerance", "0.05", "--num_images", "6", "--split_layers", "[5]",
            "--alpha_drops", "[0.0]", "--rerun_fraction", "0", "--output", "my_atm.yaml"]  # fmt: skip
    with pytest.raises(OSError, match="No space left"):
        run("calibrate", "--config", str(CONFIGS / "vit_t_dense.yaml"), *common(weights, mirrored_root), *args)
    out = capsys.readouterr().out
    assert re.search(r"chosen: .*\nmerger: \{'class_path': 'atm_lightning.merge.ATM', 'init_args': \{'alpha': ", out)


def calibration(target: float, levels_and_reductions: list[tuple[float, float]]) -> Calibration:
    shape = Shape(split_layer=11, decay_layer=10, alpha_drop=0.0)
    points = [Point(shape.merger(x, ATM()), r, 0.1, 0.9, None) for x, r in levels_and_reductions]
    return Calibration(target, 0.01, points)


def test_unreached_message_offers_the_fix_that_can_work() -> None:
    low, high = LOG_GAP_BOUNDS
    too_high = unreached_message(calibration(0.99, [(math.log(0.2), 0.3), (high, 0.62)]))
    assert too_high.endswith("saves only 62.0% on these images with these --split_layers/--decay_layers/"
                             "--alpha_drops, so choose --target_reduction 0.62 or less")
    too_low = unreached_message(calibration(0.01, [(math.log(0.2), 0.3), (low, 0.05)]))
    assert too_low.endswith("saves 5.0%, so choose --target_reduction 0.05 or more")
    ran_out = unreached_message(calibration(0.5, [(math.log(0.2), 0.3), (0.0, 0.45)]))
    assert ran_out.endswith(
        "(reductions seen: 30.0%..45.0%); raise --max_evals or --tolerance, "
        "or choose another --target_reduction"
    )


def test_help_describes_the_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("calibrate", "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Find ATM thresholds" in out and "--target_reduction" in out and "--use_labels" in out


def test_solve_level_hits_a_monotone_curve_in_few_evaluations() -> None:
    calls = []

    def error(x: float) -> float:  # a sigmoid-shaped reduction curve, root at x = -2.9
        calls.append(x)
        return 1 / (1 + math.exp(-2 * (x + 3))) - 0.55

    x, slope = solve_level(error, start=math.log(0.2), slope=0.3, tolerance=0.01, max_evals=8)
    assert abs(error(x)) <= 0.01 and slope > 0
    assert len(calls) <= 6


def test_solve_level_steps_in_from_either_end_of_the_range() -> None:
    """A shape may start where the previous one ended, at an end of the range, on the wrong side of
    its own root: the search steps back in rather than giving up."""
    low, high = LOG_GAP_BOUNDS
    for start, root in ((high, -1.0), (low, -6.0)):
        x, _ = solve_level(lambda x, root=root: 0.1 * (x - root), start, slope=0.3, tolerance=0.01, max_evals=8)
        assert abs(x - root) <= 0.1


def test_solve_level_gives_up_when_the_target_is_out_of_reach() -> None:
    assert solve_level(lambda x: -0.5, start=0.0, slope=0.3, tolerance=0.01, max_evals=20) is None
    assert solve_level(lambda x: 0.5, start=0.0, slope=0.3, tolerance=0.01, max_evals=3) is None


def test_thresholds_fall_in_every_block_as_the_level_rises() -> None:
    for shape in candidate_shapes(12):
        levels = torch.linspace(*LOG_GAP_BOUNDS, 25).tolist()
        schedules = [shape.merger(x, ATM()).thresholds(12) for x in levels]
        for lower, higher in itertools.pairwise(schedules):
            assert all(b <= a for a, b in zip(lower, higher))
        assert schedules[0][0] >= 0.9999 and schedules[-1][-1] <= -0.9


def test_shape_reproduces_the_vit_ti_reference_schedule() -> None:
    atm = Shape(split_layer=11, decay_layer=10, alpha_drop=0.0).merger(math.log(0.2), ATM())
    assert (atm.alpha, atm.theta_min, atm.split_layer) == (1.0, 0.8, 11)
    assert atm.beta == pytest.approx(math.log(1.2) / 9, rel=1e-3)  # ~0.0203: the known operating point


def test_default_grid_keeps_block_1_strict_with_attention_weighting() -> None:
    assert {(s.split_layer, s.alpha_drop) for s in candidate_shapes(12)} == {(10, 0.0), (11, 0.0), (10, 0.5), (11, 0.5)}
    assert {(s.split_layer, s.alpha_drop) for s in candidate_shapes(12, strict_first_block=True)} == {(10, 0.0), (11, 0.0)}
    assert {s.alpha_drop for s in candidate_shapes(12, alpha_drops=[0.5], strict_first_block=True)} == {0.5}


def test_bad_grid_is_refused_with_the_valid_range() -> None:
    with pytest.raises(ValueError, match=r"--decay_layers in 2..12"):
        candidate_shapes(12, decay_layers=[13])


def small_module(weights: Path, merger) -> TokenMergingModule:
    return TokenMergingModule(NAME, weights=str(weights), num_classes=NUM_CLASSES, model_kwargs=SMALL, merger=merger)


def small_datamodule(root: Path, weights: Path) -> ImageNetDataModule:
    return ImageNetDataModule(
        str(root), model_name=NAME, num_classes=NUM_CLASSES, img_size=SMALL["img_size"], batch_size=6,
        num_workers=0, class_names=str(class_names(weights)),
    )  # fmt: skip


def test_calibrate_is_a_function_that_gives_the_model_its_merger_back(mirrored_root, weights, monkeypatch) -> None:
    module = small_module(weights, ToMe(r=2))
    datamodule = small_datamodule(mirrored_root, weights)
    samples = draw_samples(datamodule, num_images=6, seed=0)
    shapes = candidate_shapes(len(module.model.blocks))
    result = calibrate(module, datamodule, samples, shapes, target=0.3, tolerance=0.03)
    assert result.best is not None and abs(result.best.reduction - 0.3) <= 0.03
    assert result.num_images == 6 and result.dense_top1 is None
    assert module.model._merging.policy == ToMe(r=2)
    chosen = result.best.merger  # not ATM before: the options that transferred best
    assert (chosen.keys, chosen.size_weighted, chosen.attention_power, chosen.keep_norm) == ("per_head", True, 0.5, True)
    assert chosen.last_block_prefix_only  # a class-token head

    def fail(*args, **kwargs):
        raise RuntimeError("search failed")

    bars = []
    scorer = calibration_run.ProgressScorer
    monkeypatch.setattr(calibration_run, "ProgressScorer", lambda *args: bars.append(scorer(*args)) or bars[-1])
    result = calibrate(module, datamodule, samples, shapes, target=0.3, tolerance=0.03, progress=True)
    # The bar counts the points evaluated, with no total: a bound of shapes x max_evals (16) ended at 4.
    assert bars[0].bar.n == len(result.points) and bars[0].bar.total is None

    monkeypatch.setattr(calibration_run, "search", fail)
    with pytest.raises(RuntimeError, match="search failed"):
        calibrate(module, datamodule, samples, shapes, target=0.3)
    assert module.model._merging.policy == ToMe(r=2)  # restored although the search raised


def test_default_rerun_fraction_tapers_with_the_target_and_keeps_a_plain_atm_plain() -> None:
    refined = SimpleNamespace(merger=NoMerge())
    fractions = [calibration_run.default_rerun_fraction(refined, t) for t in (0.2, 0.3, 0.35, 0.4, 0.5)]
    assert fractions == [0.1, 0.1, 0.075, 0.05, 0.05]
    assert calibration_run.default_rerun_fraction(SimpleNamespace(merger=ATM()), 0.3) == 0.0  # the paper's ATM
    assert calibration_run.default_rerun_fraction(SimpleNamespace(merger=ATM(rerun_margin=0.1)), 0.3) == 0.1
    with pytest.raises(ValueError, match=r"--rerun_fraction is the fraction of images run again unmerged"):
        calibration_run.check_calibrate_args(0.3, 0.01, 10, 8, rerun_fraction=0.6)


def test_a_rerun_set_on_images_the_model_almost_never_gets_wrong_is_warned_of() -> None:
    warning = calibration_run.seen_images_warning(0.995, 0.05)
    assert warning is not None and "gets 99.5% of the calibration images right" in warning
    assert "more than the 5% of new images" in warning and "--rerun_fraction 0" in warning
    assert calibration_run.seen_images_warning(0.995, 0.0) is None  # no rerun, nothing moves
    assert calibration_run.seen_images_warning(calibration_run.SEEN_IMAGES_TOP1 - 0.001, 0.1) is None


def test_the_search_starts_from_the_models_own_atm_options() -> None:
    own = ATM(keys="per_head", batch_rule="min")
    module = SimpleNamespace(merger=own, model=SimpleNamespace(cls_token=torch.zeros(1)))
    assert calibration_run.starting_merger(module) is own
    pooled = SimpleNamespace(merger=NoMerge(), model=SimpleNamespace(cls_token=None))  # average pooling
    start = calibration_run.starting_merger(pooled)
    assert start.attention_power == 0.0 and start.size_weighted and start.keep_norm and start.keys == "per_head"


def test_calibration_without_labels_reads_folders_the_head_cannot_number(mirrored_root) -> None:
    # 3 class folders for a 200-class head and no class_names file: no image has a knowable label.
    datamodule = ImageNetDataModule(str(mirrored_root), model_name=NAME, num_classes=NUM_CLASSES, num_workers=0)
    with pytest.raises(ValueError, match="3 class folders but the head has num_classes=200"):
        draw_samples(datamodule, num_images=6, seed=0)  # --use_labels true
    samples = draw_samples(datamodule, num_images=6, seed=0, labels_needed=False)
    assert len(samples) == 6 and {label for _, label in samples} == {-1}
