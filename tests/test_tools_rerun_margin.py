"""tools/rerun_margin.py: the printed margin makes that share of the training images run again."""

from __future__ import annotations

import pytest
import torch

from atm_lightning import merge_stats, patch
from atm_lightning.data import ImageNetDataModule
from atm_lightning.models import create_model
from tests.helpers import load_tool

rerun_margin = load_tool("rerun_margin")


@pytest.mark.parametrize("method", ["tome:r=8", "tome:r=8,rerun_margin=0.9"])  # a margin of its own is taken off
def test_the_margin_reruns_the_asked_share_of_the_training_images(data_root, vit_weights, capsys, method) -> None:
    weights = vit_weights(3)
    rerun_margin.main([method, "--weights", str(weights), "--data-root", str(data_root), "--fraction", "0.34", "--num-classes", "3"])
    margin = float(capsys.readouterr().out.strip().splitlines()[-1])
    data = ImageNetDataModule(str(data_root), model_name="vit_tiny_patch16_224", num_classes=3, batch_size=4, num_workers=0)
    model = patch(create_model("vit_tiny_patch16_224", weights=str(weights), num_classes=3).eval(), "tome", r=8, rerun_margin=margin)
    rerun = []
    with torch.inference_mode():
        for images, _ in data.eval_loader(data.labelled_images("train")):
            model(images)
            rerun.append(merge_stats(model).rerun)
    assert int(torch.cat(rerun).sum()) == 3  # 9 images: the 0.34 quantile lies between the 3rd and 4th gap
