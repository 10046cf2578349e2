"""tools/changed_predictions.py: changed predictions by merged certainty, and what a rerun share takes back."""

from __future__ import annotations

import pytest
import torch

from atm_lightning import patch
from atm_lightning.data import ImageNetDataModule
from atm_lightning.models import create_model
from tests.helpers import load_tool

changed_predictions = load_tool("changed_predictions")


def test_bands_count_lost_and_gained_predictions_least_certain_first() -> None:
    # Six images, three classes. The merged model's top-2 gap orders them 4, 0, 5, 2, 1, 3.
    merged = torch.tensor(
        [[2.0, 1.9, 0.0], [5.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 9.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.5]]
    )
    dense = torch.tensor(
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    )
    labels = torch.tensor([1, 0, 1, 2, 0, 1])
    # image 0: dense right (1), merged 0: lost; image 2: dense wrong (0), merged right (1): gained;
    # image 4: dense 1, merged 0 (tie broken to the first), label 0: gained; 1, 3, 5 unchanged.
    rows = changed_predictions.bands(dense, merged, labels, [1 / 3, 0.5])
    assert [(r.images, r.changed, r.lost, r.gained) for r in rows] == [(2, 2, 1, 1), (1, 0, 0, 0), (3, 1, 0, 1)]
    # Merged alone: +2 - 1 = +1 image of 6; rerunning images 4 and 0 leaves image 2's gain.
    assert [r.top1_change_after_rerun for r in rows] == pytest.approx([100 / 6, 100 / 6, 0.0])
    assert (rows[0].start, rows[0].end, rows[-1].end) == (0.0, pytest.approx(1 / 3), 1.0)


@pytest.mark.parametrize("edges", [[0.2, 0.1], [0.0, 0.5], [0.5, 1.0], [0.3, 0.3]])
def test_band_edges_must_rise_inside_the_unit_interval(edges) -> None:
    with pytest.raises(ValueError, match="--bands must rise strictly"):
        changed_predictions.check_edges(edges)


def test_the_command_counts_what_the_patched_model_changes(data_root, vit_weights, capsys) -> None:
    weights = vit_weights(3)
    # A margin of 1 would run every image again: the tool must report the merged pass alone.
    args = ["evit:keep_rate=0.5,rerun_margin=1.0", "--weights", str(weights), "--data-root", str(data_root), "--num-classes", "3"]
    rows = changed_predictions.main([*args, "--bands", "0.25", "0.5"])
    data = ImageNetDataModule(str(data_root), model_name="vit_tiny_patch16_224", num_classes=3, batch_size=4, num_workers=0)
    model = create_model("vit_tiny_patch16_224", weights=str(weights), num_classes=3).eval()
    loader = data.eval_loader(data.labelled_images("val"))
    with torch.inference_mode():
        dense = torch.cat([model(images) for images, _ in loader]).argmax(-1)
        patch(model, "evit", keep_rate=0.5)  # the method without its rerun margin
        merged = torch.cat([model(images) for images, _ in loader]).argmax(-1)
    labels = torch.cat([y for _, y in loader])
    assert sum(r.images for r in rows) == len(labels) == 8
    assert int((dense != merged).sum()) > 0  # one, on these random weights
    assert sum(r.changed for r in rows) == int((dense != merged).sum())
    assert sum(r.lost for r in rows) == int(((dense == labels) & (merged != labels)).sum())
    assert sum(r.gained for r in rows) == int(((dense != labels) & (merged == labels)).sum())
    assert rows[-1].top1_change_after_rerun == 0.0
    assert "| (no rerun) |" in capsys.readouterr().out


def test_a_missing_split_is_one_error_line(data_root, vit_weights, capsys) -> None:
    args = ["tome:r=8", "--weights", str(vit_weights(3)), "--data-root", str(data_root), "--num-classes", "3"]
    with pytest.raises(SystemExit):
        changed_predictions.main([*args, "--split", "test"])
    assert f"error: expected {data_root / 'test'} with one folder per class" in capsys.readouterr().err
