"""tools/merge_overhead.py: the merge-free replay runs each block on the method's token counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from atm_lightning import patch, unpatch
from atm_lightning.data.images import load_images
from tests.helpers import load_tool

merge_overhead = load_tool("merge_overhead")
MODEL = "vit_tiny_patch16_224"
pytestmark = pytest.mark.usefixtures("restore_threads")  # main() sets torch's thread count


def test_with_every_token_kept_the_replay_is_timms_forward(small_vit: Callable[[], nn.Module]) -> None:
    model = small_vit()
    image = torch.randn(1, 3, 224, 224)
    tokens = [197] * (len(model.blocks) + 1)
    with torch.inference_mode():
        assert torch.equal(merge_overhead.same_tokens_forward(model, image, tokens), model(image))


def test_each_block_runs_on_the_counts_the_method_left(shapes_folder: Path, small_vit: Callable[[], nn.Module]) -> None:
    model = small_vit()
    images, _ = load_images(sorted(shapes_folder.iterdir()), MODEL)
    patch(model, "tome", r=20)
    counts, ratio = merge_overhead.token_counts(model, images)
    unpatch(model)
    assert ratio > 1.0
    seen: list[tuple[str, int]] = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda mod, args, out: seen.append(("attn", args[0].shape[1])))
        block.mlp.register_forward_hook(lambda mod, args, out: seen.append(("mlp", args[0].shape[1])))
    with torch.inference_mode():
        merge_overhead.same_tokens_forward(model, images[3:4], counts[3])
    expected = [(kind, counts[3][layer + (kind == "mlp")]) for layer in range(len(model.blocks)) for kind in ("attn", "mlp")]
    assert seen == expected
    assert counts[3] == [197, 177, 157, 137, 117]  # ToMe r=20: exactly 20 fewer after each of the 4 blocks


def test_prints_the_three_forwards_and_the_step_cost(
    shapes_folder: Path, small_vit: Callable[[], nn.Module], capsys: pytest.CaptureFixture
) -> None:
    argv = ["tome:r=20", "--model", MODEL, "--random-init", "--data-root", str(shapes_folder), "--num-images", "4",
            "--runs", "1", "--threads", "1"]  # fmt: skip
    ms = merge_overhead.main(merge_overhead.build_parser().parse_args(argv))
    assert list(ms) == ["dense", "tome:r=20", "same tokens"] and all(v > 0 for v in ms.values())
    out = capsys.readouterr().out
    assert "FLOPs ratio of tome:r=20" in out and "merge step (and the patched block loop)" in out


def test_refuses_a_method_that_merges_nothing(shapes_folder: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["dense", "--random-init", "--data-root", str(shapes_folder)]
    with pytest.raises(SystemExit):
        merge_overhead.run_cli(merge_overhead.build_parser(), merge_overhead.main, argv)
    assert "name a merging method" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--runs", "0"], ["--num-images", "0"]])
def test_refuses_counts_below_one(shapes_folder: Path, extra: list[str], capsys: pytest.CaptureFixture) -> None:
    argv = ["tome:r=9", "--random-init", "--data-root", str(shapes_folder), *extra]
    with pytest.raises(SystemExit):
        merge_overhead.run_cli(merge_overhead.build_parser(), merge_overhead.main, argv)
    assert "--num-images and --runs must be >= 1" in capsys.readouterr().err
