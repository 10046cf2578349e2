"""ImageNet-style data: correctly labelled datasets, model-matched transforms, exact DDP evaluation."""

from .datasets import ImageListDataset
from .imagenet import ImageNetDataModule
from .samplers import BatchAlignedDistributedSampler
from .transforms import resolve_eval_config

__all__ = ["BatchAlignedDistributedSampler", "ImageListDataset", "ImageNetDataModule", "resolve_eval_config"]
