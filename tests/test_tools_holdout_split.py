"""tools/holdout_split.py: a seeded, disjoint and complete split of a class-folder set, as links."""

from __future__ import annotations

from pathlib import Path

import pytest

from atm_lightning.data import ImageNetDataModule
from tests.fakedata import IMAGENET_WNIDS, make_image_folder
from tests.helpers import load_tool

holdout_split = load_tool("holdout_split")


def linked(folder: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p.resolve() for p in folder.glob("*/*")}


def test_split_is_seeded_disjoint_complete_and_keeps_class_indices(tmp_path: Path) -> None:
    source = tmp_path / "images"
    make_image_folder(source, IMAGENET_WNIDS, per_class=3)
    holdout_split.main([str(source), str(tmp_path / "a"), "--fraction", "0.25", "--seed", "3"])
    holdout_split.main([str(source), str(tmp_path / "b"), "--fraction", "0.25", "--seed", "3"])
    holdout_split.main([str(source), str(tmp_path / "c"), "--fraction", "0.25", "--seed", "4"])
    train, val = linked(tmp_path / "a" / "train"), linked(tmp_path / "a" / "val")
    everything = {f"{p.parent.name}/{p.name}": p.resolve() for p in source.glob("*/*")}
    assert len(train) == round(0.25 * len(everything)) and not set(train) & set(val)
    assert train | val == everything  # every image once, each link to its own file
    assert linked(tmp_path / "b" / "train") == train and linked(tmp_path / "c" / "train") != train
    dm = ImageNetDataModule(str(tmp_path / "a"), num_workers=0)
    by_class = {wnid: i for i, wnid in enumerate(sorted(IMAGENET_WNIDS))}
    for path, label in dm.labelled_images("train") + dm.labelled_images("val"):
        assert label == by_class[Path(path).parent.name]


def test_existing_output_and_bad_fraction_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "images"
    make_image_folder(source, IMAGENET_WNIDS, per_class=1)
    for argv, message in [
        ([str(source), str(tmp_path / "o"), "--fraction", "1"], "strictly between 0 and 1"),
        ([str(source), str(source)], "exists; choose a new folder"),
        ([str(tmp_path / "empty"), str(tmp_path / "o")], "no images in class folders"),
        ([str(source), str(tmp_path / "o"), "--fraction", "0.0001"], "leaves train/ empty"),
        ([str(source), str(tmp_path / "o"), "--fraction", "0.9999"], "leaves val/ empty"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            holdout_split.main(argv)
        assert exit_info.value.code != 0 and message in f"{capsys.readouterr().err}{exit_info.value.code}"
