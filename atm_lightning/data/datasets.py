"""Image lists, class maps and label files for ImageNet-style folders.

We build datasets ourselves rather than through timm's folder reader: it numbers only the classes
present, so a subset of ImageNet would be silently labelled 0..k-1 against a 1000-way head.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from timm.data import ImageNetInfo
from torch import Tensor
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, is_image, open_rgb

Sample = tuple[Path, int]


class ImageListDataset(Dataset):
    """Images from an explicit `(path, label)` list, opened lazily as RGB and transformed;
    ``indexed`` items also carry their position in the list (to write predictions per file)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Tensor] | None = None,
        indexed: bool = False,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.indexed = indexed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.samples[index]
        image = open_rgb(path)
        item = (self.transform(image) if self.transform is not None else image), label
        return (*item, index) if self.indexed else item

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the class subfolders of a split (hidden folders skipped)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_class_names(path: str | Path) -> list[str]:
    """Class folder names, one per line, in index order (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class_names file {path} does not exist; pass a text file with one class per line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"class_names file {path} lists {duplicates} more than once; each class needs one index")
    return names


class UnnumberedClassesError(ValueError):
    """Fewer class folders than the head has classes, and no ``class_names`` file to number them."""


UNKNOWN_LABEL = -1  # an image whose class index cannot be known (see ImageNetDataModule.labelled_images)


def class_map(num_classes: int, folders: Sequence[str], class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Map class folder names to the indices of the model's head.

    Priority: an explicit `class_names` order; else the standard ImageNet-1k wnid order when the head
    has 1000 classes (so a folder holding only some classes keeps the right indices); else sorted `folders`.
    """
    if class_names is not None:
        names = list(class_names)
        source = "the class_names file"
    elif num_classes == 1000:
        names = list(ImageNetInfo().label_names())
        known = set(names)
        unknown = [f for f in folders if f not in known]
        if unknown:
            raise ValueError(
                f"class folders {unknown[:5]} are not ImageNet-1k wnids (e.g. n01440764), so they have no "
                "index in a 1000-class head; pass --data.class_names <file with one folder name per line> "
                "or set --model.num_classes to your number of classes (and --model.weights to weights "
                "with that many, or --model.new_head true to fine-tune a new head)"
            )
        return {name: index for index, name in enumerate(names)}
    else:
        names = sorted(folders)
        source = "the class folders"
    if len(names) > num_classes:
        raise ValueError(
            f"found {len(names)} classes in {source} but num_classes={num_classes}; "
            "set --model.num_classes to the number of classes"
        )
    if class_names is None and len(names) < num_classes:
        raise UnnumberedClassesError(
            f"found {len(names)} class folders but the head has num_classes={num_classes}: numbering the "
            "folders in sorted order would shift the labels of every class after a missing one; pass "
            "--data.class_names <file with all class folder names, one per line, in class-index order>"
        )
    return {name: index for index, name in enumerate(names)}


def find_split(root: str | Path, split: str, flat: bool) -> Path:
    """The folder of one split, checked so a wrong layout fails with the fix rather than later."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist; check --data.root")
    folder = root / split
    if flat:
        layout = "a flat folder of the images listed in --data.label_file"
    else:
        layout = "one folder per class, or pass --data.label_file for a flat folder of images"
    if not folder.is_dir():
        raise FileNotFoundError(f"expected {folder} with {layout}; check --data.root and the split name")
    if not flat and not class_folders(folder):
        raise ValueError(f"{folder} has no class folders; expected {layout}")
    return folder


def folder_samples(split_dir: Path, classes: dict[str, int]) -> list[Sample]:
    """`(path, label)` for every image below each class folder, sorted by folder then path."""
    samples: list[Sample] = []
    for folder in class_folders(split_dir):
        if folder not in classes:
            raise ValueError(
                f"class folder {split_dir / folder} has no class index; add it to the --data.class_names "
                "file or remove the folder"
            )
        images = sorted(p for p in (split_dir / folder).rglob("*") if is_image(p))
        if not images:
            raise ValueError(
                f"class folder {split_dir / folder} holds no images (extensions {sorted(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        samples += [(path, classes[folder]) for path in images]
    return samples


def unlabelled_samples(folder: Path) -> list[Sample]:
    """``(path, UNKNOWN_LABEL)`` for the images directly in ``folder`` when it has no class folders
    (a flat folder of unlabelled images), sorted; empty otherwise."""
    if not folder.is_dir() or class_folders(folder):
        return []
    return [(path, UNKNOWN_LABEL) for path in sorted(p for p in folder.iterdir() if is_image(p))]


def flat_samples(split_dir: Path, label_file: str | Path, num_classes: int) -> list[Sample]:
    """`(path, label)` from a flat folder and lines `<file name> <class index>`, sorted by file name.

    The index is the last field of a line and the name everything before it, so names may hold
    spaces. An image listed twice is an error: keeping either label would silently change results.
    """
    label_file = Path(label_file)
    if not label_file.is_file():
        raise FileNotFoundError(f"label file {label_file} does not exist; check --data.label_file")
    labels: dict[str, int] = {}
    lines: dict[str, list[int]] = {}
    for number, line in enumerate(label_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(
                f"{label_file}:{number}: cannot parse {line!r}; expected '<file name> <class index>', "
                "e.g. 'ILSVRC2012_val_00000001.JPEG 65'"
            )
        name, label = fields[0], int(fields[1])
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{label_file}:{number}: class index {label} is outside 0..{num_classes - 1}; "
                "check --model.num_classes"
            )
        if not (split_dir / name).is_file():
            raise FileNotFoundError(
                f"{label_file}:{number}: {split_dir / name} does not exist; the label file must match the images"
            )
        labels[name] = label
        lines.setdefault(name, []).append(number)
    repeated = {name: numbers for name, numbers in lines.items() if len(numbers) > 1}
    if repeated:
        shown = list(repeated.items())[:3]
        where = "; ".join(f"{name!r} on lines {', '.join(map(str, numbers))}" for name, numbers in shown)
        raise ValueError(
            f"{label_file} lists {len(repeated)} image(s) more than once ({where}); each image needs "
            "exactly one line, so remove the extra ones"
        )
    unlabelled = sorted(p.name for p in split_dir.iterdir() if is_image(p) and p.name not in labels)
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} images in {split_dir} have no line in {label_file} (first: {unlabelled[0]}); "
            "add their labels or move them out"
        )
    if not labels:
        raise ValueError(f"label file {label_file} lists no images; expected lines '<file name> <class index>'")
    return [(split_dir / name, labels[name]) for name in sorted(labels)]
