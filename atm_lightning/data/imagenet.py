"""The ImageNet DataModule: folders in, correctly labelled and exactly sharded batches out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities import suggested_max_num_workers
from torch.utils.data import DataLoader

from .datasets import (
    ImageListDataset,
    UNKNOWN_LABEL,
    Sample,
    UnnumberedClassesError,
    class_folders,
    class_map,
    find_split,
    flat_samples,
    folder_samples,
    read_class_names,
    unlabelled_samples,
)
from .images import image_paths
from .reproducible import EpochSampler, SeededViews
from .samplers import BatchAlignedDistributedSampler
from .transforms import eval_transform, resolve_eval_config, train_transform


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet (or any ImageFolder-style dataset) for a timm classifier.

    Class indices follow the model's head: with 1000 classes and no `class_names` file, folders are
    ImageNet-1k wnids in the standard order, so a folder holding only some classes is labelled right;
    otherwise sorted folder names (those of the split and of the train split, so that a val folder
    missing some classes keeps the training indices; fewer folders than classes is an error, as
    the numbering would be a guess) or the order of a `class_names` file.
    Eval preprocessing comes from the model's timm pretrained config; `data_config` records it.

    Args:
        root: Dataset folder holding the split subfolders (e.g. `train/` and `val/`), each with one
            folder per class; with `label_file`, the eval split is a flat folder of images instead.
        model_name: timm model whose pretrained config sets the eval preprocessing.
        num_classes: Classes of the model's head; 1000 means ImageNet-1k wnid folder names.
        batch_size: Images per batch on each device. ATM's batch rule makes results depend on it.
        num_workers: DataLoader worker processes per device; None: the CPUs this process may use,
            shared by the devices of this node, less one for the main process, at most 8 (what
            Lightning suggests; 1 on a 2-core machine, where more would only compete for the cores).
        train_split: Subfolder of `root` used for training (needed only by `fit`).
        val_split: Subfolder of `root` used for validation.
        test_split: Subfolder of `root` used for testing; defaults to `val_split`.
        predict_split: Subfolder of `root` that `atm predict` reads; defaults to `val_split`. Class
            folders (or `label_file`) give each row its label; a folder of images without class
            folders is read unlabelled, searched recursively (`--data.root PHOTOS
            --data.predict_split .` for a folder of photos).
        label_file: Lines `<file name> <class index>` (the ILSVRC val ground truth in timm's class
            order); when given, the val and test splits are read as flat folders of these files.
        class_names: Text file with one class folder name per line, in class-index order; overrides
            both the ImageNet order and the sorted folder names.
        crop_pct: Center-crop fraction for eval (resize to img_size / crop_pct first); default from
            the model's pretrained config (0.9 for timm's DeiT, whose paper used 0.875).
        interpolation: Resize interpolation for eval ("bicubic", "bilinear", ...); default from the model.
        mean: Normalization mean; default from the model.
        std: Normalization std; default from the model.
        img_size: Square input resolution; default from the model.
        limit: Use only the first N images of each eval split's sorted list, for quick runs. With
            class folders the list is sorted by folder, so the first N cover only the first classes.
        auto_augment: timm auto-augment policy for training (DeiT's RandAugment by default); None disables.
        re_prob: Random-erasing probability for training.
        color_jitter: Color-jitter strength for training (only used when auto_augment is None).
        hflip: Horizontal-flip probability for training.
        crop_scale: Area range of the training random-resized crop (DeiT: 0.08 to 1); small
            centred objects such as digits need a narrow one, e.g. [0.8, 1.0].
        eval_hflip: evaluate mirrored copies of the val/test images (with ``crop_pct``, the
            transformed copies on which a calibrated setting should still hold).
        train_labels: the training images need labels (``fit``). False (``atm fit`` sets it with
            ``--model.distill``, which learns from the dense model's outputs): the train split
            may also be class folders that cannot be numbered, or a flat folder of images; such
            images get the label -1 (unknown).

    Training batches depend only on the seed (``seed_everything``) and the epoch: each epoch's
    order and each image's augmentation are seeded (:mod:`.reproducible`), so a run resumed from
    a checkpoint sees the images an uninterrupted one would.
    """

    def __init__(
        self,
        root: str,
        model_name: str = "deit_tiny_patch16_224",
        num_classes: int = 1000,
        batch_size: int = 64,
        num_workers: int | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        predict_split: str | None = None,
        label_file: str | None = None,
        class_names: str | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        img_size: int | None = None,
        limit: int | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float = 0.3,
        hflip: float = 0.5,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        eval_hflip: bool = False,
        train_labels: bool = True,
    ):
        super().__init__()
        check_sizes(batch_size=batch_size, limit=limit, num_classes=num_classes, num_workers=num_workers)
        check_augmentation(re_prob=re_prob, color_jitter=color_jitter, hflip=hflip, crop_scale=crop_scale)
        self.root = Path(root)
        self.model_name = model_name
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split or val_split
        self.predict_split = predict_split or val_split
        self.label_file = label_file
        self.class_names = class_names
        self.limit = limit
        self.eval_hflip = eval_hflip
        self.train_labels = train_labels
        self.augment = {
            "auto_augment": auto_augment,
            "re_prob": re_prob,
            "color_jitter": color_jitter,
            "hflip": hflip,
            "crop_scale": crop_scale,
        }
        self.data_config: dict[str, Any] = resolve_eval_config(
            model_name, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std, img_size=img_size
        )
        self.train_dataset: ImageListDataset | None = None
        self.val_dataset: ImageListDataset | None = None
        self.test_dataset: ImageListDataset | None = None
        self.predict_dataset: ImageListDataset | None = None

    @property
    def workers(self) -> int:
        """DataLoader workers per device: ``num_workers``, or the default for this machine."""
        if self.num_workers is not None:
            return self.num_workers
        return default_num_workers(getattr(self.trainer, "num_devices", 1))

    @property
    def num_val_images(self) -> int:
        """Images one validation run must see across all ranks, to assert none was dropped or repeated."""
        if self.val_dataset is None:
            raise RuntimeError("call setup('validate') or setup('fit') before asking for num_val_images")
        return len(self.val_dataset)

    def setup(self, stage: str | None = None) -> None:
        """Build only the splits the stage reads, so `validate` works without a train folder."""
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = ImageListDataset(
                self.labelled_images(self.train_split, self.train_labels),
                train_transform(self.data_config, **self.augment),
            )
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            self.val_dataset = self._eval_dataset(self.val_split)
        if stage in ("test", None) and self.test_dataset is None:
            same = self.test_split == self.val_split and self.val_dataset is not None
            self.test_dataset = self.val_dataset if same else self._eval_dataset(self.test_split)
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = ImageListDataset(
                self._predict_samples()[: self.limit], eval_transform(self.data_config, hflip=self.eval_hflip), indexed=True
            )

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "fit")
        ranks, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what seed_everything set, as Lightning's own sampler reads it
        return DataLoader(
            SeededViews(dataset, seed),
            batch_size=self.batch_size,
            sampler=EpochSampler(dataset, num_replicas=ranks, rank=rank, shuffle=True, seed=seed),
            drop_last=True,
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.val_dataset, "validate"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.test_dataset, "test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.predict_dataset, "predict"))

    def _eval_loader(self, dataset: ImageListDataset) -> DataLoader:
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = BatchAlignedDistributedSampler(
                dataset, self.batch_size, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
        )

    def labelled_images(self, split: str, labels_needed: bool = True) -> list[Sample]:
        """``(path, label)`` of every image of a class-folder split of ``root``, labelled as the
        eval splits are (e.g. training images for calibration). ``labels_needed=False``: where the
        folders cannot be numbered (fewer than the classes, no ``class_names``), every image gets
        ``UNKNOWN_LABEL`` instead of an error, for work that reads the images alone; so does every
        image of a split that is a flat folder of images."""
        if not labels_needed and (flat := unlabelled_samples(self.root / split)):
            return flat
        folder = find_split(self.root, split, flat=False)
        names = read_class_names(self.class_names) if self.class_names is not None else None
        # Include the train split's folders so that a val folder missing some classes keeps their indices.
        train = self.root / self.train_split
        folders = set(class_folders(folder)) | (set(class_folders(train)) if train.is_dir() else set())
        try:
            classes = class_map(self.num_classes, sorted(folders), names)
        except UnnumberedClassesError:
            if labels_needed:
                raise
            classes = dict.fromkeys(folders, UNKNOWN_LABEL)
        return folder_samples(folder, classes)

    def eval_loader(self, samples: Sequence[Sample]) -> DataLoader:
        """These images through the eval transform, in order, in batches of ``batch_size`` (one device)."""
        dataset = ImageListDataset(samples, eval_transform(self.data_config))
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers)

    def _predict_samples(self) -> list[Sample]:
        """The predict split labelled as evaluation labels it where it can, else unlabelled images."""
        if self.label_file is not None and self.predict_split == self.val_split:
            return flat_samples(find_split(self.root, self.predict_split, flat=True), self.label_file, self.num_classes)
        folder = find_split(self.root, self.predict_split, flat=True)
        if class_folders(folder):
            return self.labelled_images(self.predict_split, labels_needed=False)
        return [(path, UNKNOWN_LABEL) for path in image_paths([folder])]

    def _eval_dataset(self, split: str) -> ImageListDataset:
        if self.label_file is not None:
            samples = flat_samples(find_split(self.root, split, flat=True), self.label_file, self.num_classes)
        else:
            samples = self.labelled_images(split)
        return ImageListDataset(samples[: self.limit], eval_transform(self.data_config, hflip=self.eval_hflip))

    @staticmethod
    def _require(dataset: ImageListDataset | None, stage: str) -> ImageListDataset:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for this dataloader")
        return dataset


def check_sizes(batch_size: int, limit: int | None, num_classes: int, num_workers: int | None) -> None:
    """Refuse sizes that cannot work, naming the option to fix."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}; set --data.batch_size")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all images), got {limit}; set --data.limit")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (or None for the default), got {num_workers}")


def check_augmentation(re_prob: float, color_jitter: float, hflip: float, crop_scale: tuple[float, float]) -> None:
    """Refuse training augmentation settings outside their range, naming the option."""
    for name, value in (("re_prob", re_prob), ("hflip", hflip)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--data.{name} is a probability, in [0, 1]; got {value}")
    if color_jitter < 0:
        raise ValueError(f"--data.color_jitter must be >= 0, got {color_jitter}")
    low, high = crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"--data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(crop_scale)}")


def default_num_workers(devices: int = 1) -> int:
    """DataLoader workers per device when none are given: Lightning's suggestion, at most 8.

    A fixed 4 made torch warn on 2-core machines (more workers than cores); the suggestion never
    exceeds the cores and keeps Lightning's "too few workers" warning quiet too.
    """
    return min(8, suggested_max_num_workers(max(1, devices)))
