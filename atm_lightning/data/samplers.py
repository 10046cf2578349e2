"""Exact multi-device evaluation: every rank sees whole global batches of the one-device run."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class BatchAlignedDistributedSampler(DistributedSampler):
    """Deal contiguous global batches round-robin to ranks, with no padding and no duplicates.

    torch's DistributedSampler pads with repeated images and strides single indices across ranks. Both
    change evaluation results: repeats bias the accuracy, and because ATM's batch rule lets an image's
    merging depend on its batch-mates, a different batch composition changes predictions. Here the
    dataset order is cut into blocks of `batch_size` (the last may be short) and rank r yields blocks
    r, r+W, r+2W, ...; a DataLoader with the same `batch_size` and `drop_last=False` then rebuilds
    exactly the one-device batches. Ranks may run different numbers of batches, so evaluation must
    sync only at epoch end. Subclassing DistributedSampler makes Lightning keep it instead of
    injecting its own padding sampler.

    Args:
        dataset: the dataset to split (only its length is used).
        batch_size: the per-device batch size of the DataLoader using this sampler.
        num_replicas: world size (default: from torch.distributed).
        rank: this process's global rank (default: from torch.distributed).
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int | None = None, rank: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.batch_size = batch_size
        num_batches = -(-len(dataset) // batch_size)
        if self.num_replicas > num_batches:
            raise ValueError(too_few_batches(len(dataset), batch_size, self.num_replicas))
        self.batches = range(self.rank, num_batches, self.num_replicas)
        self.num_samples = sum(len(self._block(batch)) for batch in self.batches)
        self.total_size = len(dataset)

    def _block(self, batch: int) -> range:
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, len(self.dataset)))

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches:
            yield from self._block(batch)

    def __len__(self) -> int:
        return self.num_samples


def too_few_batches(num_images: int, batch_size: int, devices: int) -> str:
    """Why ``devices`` ranks cannot each get a batch, with only the fixes that would work."""
    num_batches = -(-num_images // batch_size)
    fixes = [f"at most {num_batches} devices (--trainer.devices)"]
    if batch_size > 1 and num_images >= devices:
        fixes.append(f"a batch size of at most {num_images // devices} (--data.batch_size)")
    return (
        f"{num_images} images make {num_batches} batches of {batch_size}, too few for {devices} "
        f"devices (each needs at least one batch); use {' or '.join(fixes)}"
    )
