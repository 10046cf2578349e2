"""BatchAlignedDistributedSampler: DDP ranks together see exactly the one-device batches."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from atm_lightning.data import BatchAlignedDistributedSampler


def one_device_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def rank_batches(n: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Batches a DataLoader with the sampler gives one rank (the dataset is its own indices)."""
    dataset = list(range(n))
    sampler = BatchAlignedDistributedSampler(dataset, batch_size, num_replicas=world_size, rank=rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)
    batches = [batch.tolist() for batch in loader]
    assert len(sampler) == sum(map(len, batches))
    return batches


CASES = [
    (n, batch_size, world_size)
    for n in (1, 7, 9, 10, 33)
    for batch_size in (1, 3, 4, 8)
    for world_size in (1, 2, 3)
    if world_size <= len(one_device_batches(n, batch_size))  # fewer batches than ranks is refused
]


@pytest.mark.parametrize(("n", "batch_size", "world_size"), CASES)
def test_ranks_together_see_the_one_device_batches(n: int, batch_size: int, world_size: int) -> None:
    expected = one_device_batches(n, batch_size)
    per_rank = [rank_batches(n, batch_size, world_size, rank) for rank in range(world_size)]
    for rank, batches in enumerate(per_rank):
        assert batches == expected[rank::world_size]
    union = sorted(batch for batches in per_rank for batch in batches)
    assert union == expected
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == list(range(n))


def test_nine_images_batch_four_two_ranks() -> None:
    assert rank_batches(9, 4, 2, 0) == [[0, 1, 2, 3], [8]]
    assert rank_batches(9, 4, 2, 1) == [[4, 5, 6, 7]]


def test_is_a_distributed_sampler_so_lightning_keeps_it() -> None:
    sampler = BatchAlignedDistributedSampler(range(10), 4, num_replicas=2, rank=1)
    assert isinstance(sampler, DistributedSampler)
    sampler.set_epoch(3)
    assert list(sampler) == [4, 5, 6, 7] and len(sampler) == 4


def test_refuses_a_rank_without_a_batch_and_offers_only_fixes_that_work() -> None:
    with pytest.raises(ValueError, match=r"3 batches of 4, too few for 4 devices.*use at most 3 devices "
                       r"\(--trainer.devices\) or a batch size of at most 2 \(--data.batch_size\)$"):
        BatchAlignedDistributedSampler(range(9), 4, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="too few for 2 devices"):
        BatchAlignedDistributedSampler(range(4), 4, num_replicas=2, rank=0)
    # At batch size 1 (or with fewer images than devices) a smaller batch cannot help.
    for batch_size, devices in ((1, 3), (2, 2)):
        message = rf"too few for 4 devices .*; use at most {devices} devices"
        with pytest.raises(ValueError, match=message) as error:
            BatchAlignedDistributedSampler(range(3), batch_size, num_replicas=4, rank=0)
        assert "batch size" not in str(error.value)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchAlignedDistributedSampler(range(9), 0, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="rank"):
        BatchAlignedDistributedSampler(range(9), 4, num_replicas=2, rank=2)
