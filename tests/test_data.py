"""ImageNetDataModule: labels that match the model's head, model-matched transforms, clear errors."""

from __future__ import annotations

import copy
import os
import pickle
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import lightning.pytorch as pl
import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from PIL import Image
from torchvision.transforms import CenterCrop, Resize

from atm_lightning.data import BatchAlignedDistributedSampler, ImageNetDataModule
from atm_lightning.data import transforms
from atm_lightning.data.images import open_rgb
from atm_lightning.data.imagenet import default_num_workers
from atm_lightning.data.reproducible import EpochSampler
from atm_lightning.data.transforms import resolve_eval_config, train_transform
from tests.fakedata import IMAGENET_WNIDS, make_flat_val, make_image_folder


def datamodule(root: Path, **kwargs) -> ImageNetDataModule:
    kwargs.setdefault("num_workers", 0)
    return ImageNetDataModule(root=str(root), **kwargs)


def val_labels(dm: ImageNetDataModule) -> list[int]:
    dm.setup("validate")
    return dm.val_dataset.targets


def first_transform(dataset, kind: type):
    return next(t for t in dataset.transform.transforms if isinstance(t, kind))


# --- class indices ---------------------------------------------------------------------------------------


def test_imagenet_subset_keeps_the_1000_class_indices(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", IMAGENET_WNIDS[1:], per_class=2)
    assert val_labels(datamodule(tmp_path)) == [1, 1, 2, 2]


def test_sorted_folder_names_without_imagenet(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["c", "a", "b"], per_class=1)
    dm = datamodule(tmp_path, num_classes=3)
    assert val_labels(dm) == [0, 1, 2]
    assert [path.parent.name for path, _ in dm.val_dataset.samples] == ["a", "b", "c"]


def test_class_names_file_sets_the_order(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a", "b", "c"], per_class=1)
    names = tmp_path / "classes.txt"
    names.write_text("c\nb\n\na\n")
    assert val_labels(datamodule(tmp_path, num_classes=3, class_names=str(names))) == [2, 1, 0]


def test_val_missing_a_class_keeps_the_train_indices(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", ["a", "b", "c"], per_class=1)
    make_image_folder(tmp_path / "val", ["b", "c"], per_class=1)
    assert val_labels(datamodule(tmp_path, num_classes=3)) == [1, 2]


def test_fewer_class_folders_than_classes_is_refused_without_class_names(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["b", "c"], per_class=1)  # "a" (index 0) has no folder anywhere
    with pytest.raises(ValueError, match="2 class folders but the head has num_classes=3.*--data.class_names"):
        val_labels(datamodule(tmp_path, num_classes=3))
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\nc\n")
    assert val_labels(datamodule(tmp_path, num_classes=3, class_names=str(names))) == [1, 2]


@pytest.mark.shared
def test_real_imagenet_sample_is_labelled_in_wnid_order(shared_images: Path) -> None:
    dm = ImageNetDataModule(root=str(shared_images.parent), num_workers=0)
    assert val_labels(dm) == list(range(1000))
    image, label = dm.val_dataset[999]
    assert image.shape == (3, 224, 224) and label == 999


def test_flat_folder_with_label_file(tmp_path: Path) -> None:
    folder, label_file = make_flat_val(tmp_path, n=6, num_classes=5, seed=3)
    dm = datamodule(tmp_path, num_classes=5, label_file=str(label_file))
    expected = [int(line.split()[1]) for line in label_file.read_text().splitlines()]
    assert val_labels(dm) == expected
    assert [path.name for path, _ in dm.val_dataset.samples] == sorted(p.name for p in folder.iterdir())


def test_label_file_names_may_hold_spaces(tmp_path: Path) -> None:
    folder, label_file = make_flat_val(tmp_path, n=2, num_classes=5, seed=3)
    for name in ("my photo 1.JPEG", "two  spaces.png"):
        (folder / name).write_bytes((folder / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    label_file.write_text(label_file.read_text() + "my photo 1.JPEG 4\n  two  spaces.png\t2  \n")
    dm = datamodule(tmp_path, num_classes=5, label_file=str(label_file))
    dm.setup("validate")
    labels = {path.name: label for path, label in dm.val_dataset.samples}
    assert labels["my photo 1.JPEG"] == 4 and labels["two  spaces.png"] == 2 and len(labels) == 4


def test_label_file_listing_an_image_twice_is_refused(tmp_path: Path) -> None:
    _, label_file = make_flat_val(tmp_path, n=3, num_classes=5, seed=3)
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join([*lines, "", "ILSVRC2012_val_00000002.JPEG 0"]) + "\n")
    # Before, the last line won silently (top-1 80 -> 75 on a small set).
    message = r"lists 1 image\(s\) more than once \('ILSVRC2012_val_00000002.JPEG' on lines 2, 5\)"
    with pytest.raises(ValueError, match=rf"{label_file} {message}.*remove the extra"):
        datamodule(tmp_path, num_classes=5, label_file=str(label_file)).setup("validate")


def test_image_extensions_are_case_insensitive_and_other_files_ignored(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a"], per_class=1, ext=".jpg")
    make_image_folder(tmp_path / "val", ["a"], per_class=1, seed=1, ext=".PNG")
    (tmp_path / "val" / "a" / "notes.txt").write_text("not an image")
    dm = datamodule(tmp_path, num_classes=1)
    dm.setup("validate")
    assert sorted(path.name for path, _ in dm.val_dataset.samples) == ["a_0.PNG", "a_0.jpg"]


def test_limit_takes_the_first_images_of_the_sorted_list(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a", "b"], per_class=3)
    dm = datamodule(tmp_path, num_classes=2, limit=4)
    assert val_labels(dm) == [0, 0, 0, 1]
    assert dm.num_val_images == 4


# --- transforms and loading ------------------------------------------------------------------------------


def test_eval_transform_follows_timm_config_and_overrides(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", IMAGENET_WNIDS, per_class=1)
    default = datamodule(tmp_path)
    assert default.data_config["crop_pct"] == pytest.approx(0.9)  # timm's DeiT config, before setup
    default.setup("validate")
    assert first_transform(default.val_dataset, Resize).size == 248

    dm = datamodule(tmp_path, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    assert dm.data_config == {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    dm.setup("validate")
    assert first_transform(dm.val_dataset, Resize).size == 256  # floor(224 / 0.875)
    image, label = dm.val_dataset[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 0


def test_img_size_and_other_model_config(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", IMAGENET_WNIDS, per_class=1)
    dm = datamodule(tmp_path, model_name="vit_tiny_patch16_224", img_size=96)
    assert dm.data_config["mean"] == (0.5, 0.5, 0.5) and dm.data_config["input_size"] == (3, 96, 96)
    dm.setup("validate")
    assert first_transform(dm.val_dataset, CenterCrop).size == (96, 96)
    assert dm.val_dataset[0][0].shape == (3, 96, 96)


DEIT_AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "color_jitter": 0.3, "hflip": 0.5}


def shipped_train_transform(img_size: int = 32):
    """The `*_ft.yaml` configs' augmentation (the DataModule defaults), at a small size for speed."""
    return train_transform(resolve_eval_config("deit_tiny_patch16_224", img_size=img_size), **DEIT_AUGMENT)


def test_posterize_at_magnitude_10_keeps_no_bits_as_black() -> None:
    # rand-m9-mstd0.5-inc1 keeps 4 - int(m / 10 * 4) bits: 0 at the magnitude ceiling of 10, which
    # Pillow 13 refuses (ValueError) and older Pillow turned into a black image.
    (randaugment,) = [t for t in shipped_train_transform().transforms if isinstance(t, RandAugment)]
    (op,) = [op for op in randaugment.ops if op.name == "PosterizeIncreasing"]
    op = copy.deepcopy(op)
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.new("RGB", (20, 10), (200, 120, 40))
    black = op(image)
    assert black.mode == "RGB" and black.size == (20, 10) and black.getextrema() == ((0, 0),) * 3
    assert pickle.loads(pickle.dumps(op))(image).getextrema() == ((0, 0),) * 3  # DataLoader workers
    op.magnitude = 5  # 2 bits kept: timm's own posterize, unchanged
    assert op(image).getpixel((0, 0)) == (192, 64, 0)


def test_shipped_augmentation_survives_2000_draws(monkeypatch) -> None:
    zero_bits = []
    posterize = transforms.posterize

    def counting(image, bits_to_keep, **kwargs):
        zero_bits.append(bits_to_keep <= 0)
        return posterize(image, bits_to_keep, **kwargs)

    monkeypatch.setattr(transforms, "posterize", counting)
    transform = shipped_train_transform()
    image = Image.new("RGB", (48, 48), (120, 80, 200))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    for _ in range(2000):
        assert transform(image).shape == (3, 32, 32)
    assert sum(zero_bits) >= 2  # seed 0 draws the 0-bit case 3 times (first at draw 35)


def test_validate_needs_no_train_split_and_fit_builds_augmented_train(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a", "b"], per_class=2)
    dm = datamodule(tmp_path, num_classes=2, batch_size=3, img_size=32)
    dm.setup("validate")
    assert dm.train_dataset is None and dm.test_dataset is None

    make_image_folder(tmp_path / "train", ["a", "b"], per_class=4)
    dm.setup("fit")
    assert first_transform(dm.train_dataset, RandomResizedCropAndInterpolation).size == (32, 32)
    assert first_transform(dm.train_dataset, RandAugment) is not None
    assert first_transform(dm.train_dataset, RandomErasing).probability == 0.25
    loader = dm.train_dataloader()
    assert loader.drop_last and isinstance(loader.sampler, EpochSampler) and loader.sampler.shuffle
    assert [len(labels) for _, labels in loader] == [3, 3]

    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset  # test_split defaults to val_split
    assert [labels.tolist() for _, labels in dm.test_dataloader()] == [[0, 0, 1], [1]]


def test_training_batches_depend_on_the_seed_and_epoch_alone(tmp_path: Path, monkeypatch) -> None:
    """A resumed run must see the images, in the order and the augmented views, an uninterrupted
    one saw: whatever else drew from the random generators before."""
    make_image_folder(tmp_path / "train", ["a", "b"], per_class=3)
    make_image_folder(tmp_path / "val", ["a", "b"], per_class=1)
    dm = datamodule(tmp_path, num_classes=2, batch_size=2, img_size=32)
    dm.setup("fit")

    def epoch(number: int, seed: int = 0) -> torch.Tensor:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(number)
        return torch.cat([images for images, _ in loader])

    first = epoch(1)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # other draws in between
    assert torch.equal(epoch(1), first)
    assert not torch.equal(epoch(2), first) and not torch.equal(epoch(1, seed=1), first)


# --- exact multi-device evaluation -----------------------------------------------------------------------


def loader_batches(dm: ImageNetDataModule, rank: int, world_size: int) -> list[list[str]]:
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    loader = dm.val_dataloader()
    return [list(indices) for indices in loader.batch_sampler]


def test_val_dataloader_shards_whole_batches_across_ranks(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a", "b", "c"], per_class=3)
    dm = datamodule(tmp_path, num_classes=3, batch_size=4, img_size=32)
    dm.setup("validate")
    rank0, rank1 = loader_batches(dm, 0, 2), loader_batches(dm, 1, 2)
    assert rank0 == [[0, 1, 2, 3], [8]] and rank1 == [[4, 5, 6, 7]]
    labels = [batch_labels.tolist() for _, batch_labels in dm.val_dataloader()]  # rank 1's loader
    assert labels == [[1, 1, 2, 2]]

    with pytest.raises(ValueError, match="too few for 4 devices"):
        loader_batches(dm, 0, 4)


class RecordBatches(pl.LightningModule):
    """Writes the labels of each validation batch to `<folder>/rank<r>.txt`."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        assert isinstance(self.trainer.val_dataloaders.sampler, BatchAlignedDistributedSampler)
        with open(self.folder / f"rank{self.global_rank}.txt", "a") as f:
            f.write(" ".join(map(str, batch[1].tolist())) + "\n")


def test_lightning_ddp_keeps_the_batch_aligned_sampler(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a", "b", "c"], per_class=3)
    dm = datamodule(tmp_path, num_classes=3, batch_size=4, img_size=32)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(RecordBatches(tmp_path), datamodule=dm)
    assert (tmp_path / "rank0.txt").read_text() == "0 0 0 1\n2\n"
    assert (tmp_path / "rank1.txt").read_text() == "1 1 2 2\n"


# --- errors that name the fix ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "devices", "workers"), [(2, 1, 1), (1, 1, 1), (16, 1, 8), (16, 8, 1), (32, 4, 7)]
)
def test_default_workers_follow_the_cpus_and_devices(tmp_path, monkeypatch, cpus, devices, workers) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    dm = ImageNetDataModule(root=str(tmp_path), img_size=32)
    assert dm.num_workers is None
    dm.trainer = SimpleNamespace(num_devices=devices, world_size=devices, global_rank=0)
    assert dm.workers == default_num_workers(devices) == workers
    assert ImageNetDataModule(root=str(tmp_path), img_size=32, num_workers=3).workers == 3


def test_default_workers_raise_no_warning_on_two_cores(tmp_path: Path, monkeypatch) -> None:
    # The old default of 4 made torch warn "will create 4 worker processes ... suggested max ... is 2".
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    make_image_folder(tmp_path / "val", ["a", "b"], per_class=2)
    dm = ImageNetDataModule(root=str(tmp_path), num_classes=2, batch_size=2, img_size=32)
    dm.setup("validate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [len(labels) for _, labels in dm.val_dataloader()] == [2, 2]
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_bad_arguments_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        datamodule(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        datamodule(tmp_path, limit=0)
    with pytest.raises(ValueError, match=r"unknown timm model 'deit_tinyy_patch16_224'.*deit_tiny_patch16_224"):
        datamodule(tmp_path, model_name="deit_tinyy_patch16_224")
    with pytest.raises(ValueError, match="Known pretrained tags"):
        datamodule(tmp_path, model_name="deit_tiny_patch16_224.no_such_tag")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # crop_pct 0 became timm's default 0.9; 2 resized to 112 px and padded black; -0.5 crashed in torchvision
        ({"crop_pct": 0.0}, r"--data.crop_pct is the share .* in \(0, 1\] .*got 0.0"),
        ({"crop_pct": 2.0}, r"--data.crop_pct .* got 2.0"),
        ({"crop_pct": -0.5}, r"--data.crop_pct .* got -0.5"),
        ({"interpolation": "bicubik"}, r"--data.interpolation must be one of bicubic, bilinear"),
        ({"std": (0.5, 0.0, 0.5)}, r"--data.std values divide the pixels, so they must be > 0"),
        ({"img_size": 0}, r"--data.img_size must be >= 1"),
        ({"hflip": 1.5}, r"--data.hflip is a probability, in \[0, 1\]"),
        ({"re_prob": -0.1}, r"--data.re_prob is a probability"),
        ({"crop_scale": (0.9, 0.5)}, r"--data.crop_scale must be \[low, high\] with 0 < low <= high <= 1"),
    ],
)
def test_settings_out_of_range_are_refused_at_construction(tmp_path: Path, setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        datamodule(tmp_path, model_name="vit_tiny_patch16_224", **setting)


def test_a_crop_of_all_the_image_is_allowed(tmp_path: Path) -> None:
    assert datamodule(tmp_path, crop_pct=1.0).data_config["crop_pct"] == 1.0


@pytest.mark.parametrize("bits", [16, 8])
def test_images_are_read_at_their_own_bit_depth(tmp_path: Path, bits: int) -> None:
    # A 16-bit grey PNG was read as all white: Pillow's convert("RGB") clips its values at 255.
    ramp = np.linspace(0, 2**bits - 1, 64 * 64).reshape(64, 64).astype(np.uint16 if bits == 16 else np.uint8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == ("I;16" if bits == 16 else "L")
    rgb = np.asarray(open_rgb(tmp_path / "ramp.png"))
    want = np.round(ramp.astype(np.float64) * 255 / (2**bits - 1)).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert all(np.array_equal(rgb[..., channel], want) for channel in range(3))


def test_images_without_a_known_range_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 0.25, np.float32)).save(tmp_path / "unit.tif")
    assert np.asarray(open_rgb(tmp_path / "unit.tif"))[0, 0, 0] == 64  # floats in [0, 1]: scaled by 255
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif holds floating-point pixels from 3 to 3, not in \[0, 1\]"):
        open_rgb(tmp_path / "float.tif")
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(ValueError, match=r"int32.tif holds 32-bit integer pixels"):
        open_rgb(tmp_path / "int32.tif")


def test_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset root .* does not exist"):
        datamodule(tmp_path / "nowhere").setup("validate")
    make_image_folder(tmp_path / "train", ["a"], per_class=1)
    with pytest.raises(FileNotFoundError, match=r"expected .*val with one folder per class.*--data.label_file"):
        datamodule(tmp_path, num_classes=1).setup("validate")


def test_flat_folder_without_label_file(tmp_path: Path) -> None:
    make_flat_val(tmp_path, n=2, num_classes=3)
    with pytest.raises(ValueError, match="has no class folders.*--data.label_file"):
        datamodule(tmp_path, num_classes=3).setup("validate")


def test_empty_class_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a"], per_class=1)
    (tmp_path / "val" / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*b holds no images"):
        datamodule(tmp_path, num_classes=2).setup("validate")


def test_corrupt_image_is_named_when_loaded(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a"], per_class=2)
    (tmp_path / "val" / "a" / "a_1.JPEG").write_bytes(b"not a jpeg")
    dm = datamodule(tmp_path, num_classes=1)
    dm.setup("validate")
    assert dm.val_dataset[0][1] == 0
    with pytest.raises(ValueError, match=r"cannot read image .*a_1\.JPEG"):
        dm.val_dataset[1]


def test_folders_that_do_not_fit_the_head(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", ["a", "b", "c"], per_class=1)
    with pytest.raises(ValueError, match=r"not ImageNet-1k wnids.*--data.class_names") as error:
        datamodule(tmp_path).setup("validate")
    # data.num_classes follows model.num_classes in the CLI, which refuses it as an option.
    assert "--model.num_classes" in str(error.value) and "--data.num_classes" not in str(error.value)
    with pytest.raises(ValueError, match="found 3 classes in the class folders but num_classes=2"):
        datamodule(tmp_path, num_classes=2).setup("validate")
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"class folder .*c has no class index"):
        datamodule(tmp_path, num_classes=3, class_names=str(names)).setup("validate")
    with pytest.raises(FileNotFoundError, match="class_names file .* does not exist"):
        datamodule(tmp_path, num_classes=3, class_names=str(tmp_path / "nope.txt")).setup("validate")
    names.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"lists \['a'\] more than once"):
        datamodule(tmp_path, num_classes=3, class_names=str(names)).setup("validate")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("ILSVRC2012_val_00000001.JPEG 7", r"class index 7 is outside 0..4"),
        ("ILSVRC2012_val_00000001.JPEG", r"val_labels.txt:1: cannot parse .*'<file name> <class index>'"),
        ("ILSVRC2012_val_00000001.JPEG one", "cannot parse"),
        ("missing.JPEG 1", r"missing.JPEG does not exist"),
    ],
)
def test_bad_label_file(tmp_path: Path, line: str, match: str) -> None:
    _, label_file = make_flat_val(tmp_path, n=1, num_classes=5)
    label_file.write_text(line + "\n")
    error = FileNotFoundError if "missing" in line else ValueError
    with pytest.raises(error, match=match):
        datamodule(tmp_path, num_classes=5, label_file=str(label_file)).setup("validate")


def test_missing_label_file(tmp_path: Path) -> None:
    make_flat_val(tmp_path, n=1, num_classes=5)
    with pytest.raises(FileNotFoundError, match=r"label file .*nope.txt does not exist; check --data.label_file"):
        datamodule(tmp_path, num_classes=5, label_file=str(tmp_path / "nope.txt")).setup("validate")


def test_image_without_a_label_line(tmp_path: Path) -> None:
    _, label_file = make_flat_val(tmp_path, n=3, num_classes=5)
    label_file.write_text("\n".join(label_file.read_text().splitlines()[:2]))
    with pytest.raises(ValueError, match="1 images in .* have no line in"):
        datamodule(tmp_path, num_classes=5, label_file=str(label_file)).setup("validate")


def test_eval_hflip_mirrors_every_eval_image(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "val", IMAGENET_WNIDS, per_class=1)
    plain, mirrored = datamodule(tmp_path), datamodule(tmp_path, eval_hflip=True)
    for dm in (plain, mirrored):
        dm.setup("validate")
    for i in range(len(plain.val_dataset)):
        (image, label), (flipped, flipped_label) = plain.val_dataset[i], mirrored.val_dataset[i]
        assert label == flipped_label and not torch.equal(image, flipped)
        torch.testing.assert_close(flipped, image.flip(-1), atol=1e-6, rtol=0)
