"""tools/visualize.py, driven in-process on generated images and a small random ViT."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from atm_lightning import merge_stats, patch
from atm_lightning.vis import paint_merged_groups
from tests import test_tools_benchmark as bench
from tests.test_tools_benchmark import ATM_SPEC, MODEL, SMALL_DEPTH, cli_error, draw_shapes

_common = importlib.import_module("_common")  # tools/ is on sys.path since test_tools_benchmark
visualize = importlib.import_module("visualize")
shapes_folder = bench.shapes_folder
small_vit = bench.small_vit
LAYERS = [1, 2, 4]


def test_grid_size_and_token_counts_match_merge_stats(
    tmp_path: Path, shapes_folder: Path, small_vit: Callable[[], nn.Module], capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out" / "grid.png"
    argv = [
        "--model", MODEL, "--random-init", "--images", str(shapes_folder), "--method", ATM_SPEC,
        "--layers", *map(str, LAYERS), "--output", str(output),
    ]  # fmt: skip
    visualize.main(visualize.build_parser().parse_args(argv))
    printed = capsys.readouterr().out

    # one row per image: the original, then one tile per layer; 224 px tiles, 2 px padding
    grid = Image.open(output)
    assert grid.size == ((1 + len(LAYERS)) * 226 + 2, 4 * 226 + 2)
    paths = sorted(shapes_folder.iterdir())
    images, config = _common.load_images(paths, MODEL)
    original = pil_to_tensor(grid.convert("RGB"))[:, 2:226, 2:226].float() / 255
    assert (original - _common.unnormalize(images[:1], config)[0]).abs().max() <= 1 / 255 + 1e-6

    # counts beside the PNG equal merge_stats of the same model, method and image
    written = json.loads(output.with_suffix(".json").read_text())
    assert written["layers"] == LAYERS and written["method"] == ATM_SPEC
    model = small_vit()
    patch(model, _common.parse_method(ATM_SPEC).merger)
    last = []
    for path, image, record in zip(paths, images, written["images"]):
        with torch.inference_mode():
            model(image[None])
        tokens = merge_stats(model).tokens[0]
        expected = {str(layer): int(tokens[layer]) for layer in [0, *LAYERS]}
        assert record["path"] == str(path) and record["tokens"] == expected
        counts = " | ".join(str(expected[str(layer)]) for layer in LAYERS)
        assert f"| {path.name} | 197 | {counts} |" in printed
        last.append(int(tokens[SMALL_DEPTH]))
    # Figure 1: the flat image keeps the fewest tokens, the busy one (40 rectangles) the most
    assert last[0] == min(last) and last[-1] == max(last) and last[0] < last[-1] < 197


def test_tiles_are_the_merged_groups_after_each_chosen_block(
    tmp_path: Path, small_vit: Callable[[], nn.Module], capsys: pytest.CaptureFixture
) -> None:
    path = draw_shapes(tmp_path / "three_rects.png", num_rects=3, seed=2)
    argv = ["--random-init", "--images", str(path), "--method", ATM_SPEC, "--layers", "1", "4"]
    (picture,) = visualize.main(
        visualize.build_parser().parse_args([*argv, "--output", str(tmp_path / "g.png")])
    )
    assert picture.tiles.shape == (3, 3, 224, 224)
    # after block 1 (alpha = 1) nothing merged: every 16x16 patch is its own outlined group
    assert picture.tokens[1] == 197 and picture.tokens[4] < 100
    assert (picture.tiles[1][:, :, 96] == 0).all()

    images, config = _common.load_images([path], MODEL)
    model = small_vit()
    patch(model, visualize.tracing(_common.parse_method(ATM_SPEC)))
    with torch.inference_mode():
        model(images)
    original = _common.unnormalize(images, config)
    for tile, layer in zip(picture.tiles[1:], (1, 4)):
        painted = paint_merged_groups(original, merge_stats(model).sources[layer - 1], 16, 1)[0]
        below_label = slice(16, None)  # the top rows carry the "block l: n tokens" label
        assert (tile[:, below_label] - painted[:, below_label]).abs().max() <= 1 / 255 + 1e-6
        assert (tile[:, :12, :40] == 0).any()  # the label box is there


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "/nonexistent/photos"], "/nonexistent/photos does not exist"),
        (["--layers", "0", "5"], "--layers [0, 5] are not blocks of this model; use block numbers 1..4"),
        (["--method", "tome:r=[1,2]"], "ToMe r has 2 entries but the model has 4 blocks"),
        (["--output", "grid.jpg"], "must end in .png"),
    ],
)
def test_user_errors_name_the_fix(
    shapes_folder: Path,
    small_vit: Callable[[], nn.Module],
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
) -> None:
    argv = ["--random-init", "--images", str(shapes_folder), "--method", "tome:r=4", "--layers", "2", *extra]
    assert message in cli_error(visualize, argv, capsys)


def test_rejects_files_that_are_not_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    message = cli_error(visualize, ["--random-init", "--images", str(notes), "--method", "dense"], capsys)
    assert "notes.txt is not an image" in message
