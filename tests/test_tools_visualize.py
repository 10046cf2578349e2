"""tools/visualize.py, driven in-process on generated images and a small random ViT."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from atm_lightning import merge_stats, patch
from atm_lightning.data.images import load_images, unnormalize
from atm_lightning.evaluation.options import parse_method
from atm_lightning.vis import paint_merged_groups
from tests.helpers import SMALL_DEPTH, draw_shapes, load_tool, usage_error

visualize = load_tool("visualize")
MODEL = "vit_tiny_patch16_224"
ATM_SPEC = "atm:alpha=1.0,beta=0.03,theta_min=0.7,split_layer=4"
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
    images, config = load_images(paths, MODEL)
    original = pil_to_tensor(grid.convert("RGB"))[:, 2:226, 2:226].float() / 255
    assert (original - unnormalize(images[:1], config)[0]).abs().max() <= 1 / 255 + 1e-6

    # counts beside the PNG equal merge_stats of the same model, method and image
    written = json.loads(output.with_suffix(".json").read_text())
    assert written["layers"] == LAYERS and written["method"] == ATM_SPEC
    model = small_vit()
    patch(model, parse_method(ATM_SPEC).merger)
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

    images, config = load_images([path], MODEL)
    model = small_vit()
    patch(model, visualize.tracing(parse_method(ATM_SPEC)))
    with torch.inference_mode():
        model(images)
    original = unnormalize(images, config)
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
    assert message in usage_error(visualize.build_parser(), visualize.main, argv, capsys)


def test_rejects_files_that_are_not_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    argv = ["--random-init", "--images", str(notes), "--method", "dense"]
    message = usage_error(visualize.build_parser(), visualize.main, argv, capsys)
    assert "notes.txt is not an image" in message
