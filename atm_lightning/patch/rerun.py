"""Running uncertain images again without merging (the ``rerun_margin`` setting of every policy).

Merging changes a prediction almost only where the model was torn between two classes. The
merged pass's own softmax says which images those are: where its two largest probabilities lie
within ``rerun_margin`` of each other, the image runs again through the dense model and keeps
the dense output. Up to the block where the batch first merged, the merged pass ran exactly as
the unmerged model, so the second pass picks up there, after that block's attention, from the
tokens the merged pass kept (a batch where nothing merged has the dense output already). The
second pass is real work, so the record of the forward marks those images and
:func:`.stats.merge_stats` adds what it computed to their FLOPs (with ``last_block_prefix_only``,
its last block computes the prefix tokens only, too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from ..merge import NoMerge
from .loop import Merging
from .stats import Resume


@contextmanager
def running_dense(merging: Merging, prefix_only: bool = False, start: Resume | None = None) -> Iterator[None]:
    """Inside the block the model runs unmerged; its policy and last record are restored after.
    ``prefix_only`` keeps the policy's ``last_block_prefix_only`` (same logits, cheaper); ``start``
    makes the next forward's blocks pick up there (its images are then not read)."""
    policy, last = merging.policy, merging.last
    merging.policy = NoMerge(last_block_prefix_only=prefix_only and policy.last_block_prefix_only)
    merging.start = start
    try:
        yield
    finally:
        merging.policy, merging.last, merging.start = policy, last, None


def top2_gap(logits: Tensor) -> Tensor:
    """[B] the gap between the two largest softmax probabilities of each row (1 with one class)."""
    probs = logits.float().softmax(-1)
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], device=probs.device)
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


class RerunForward:
    """First base of every merging mixin: timm's ``forward``, with the policy's ``rerun_margin``
    running uncertain images again unmerged."""

    _merging: Merging

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        parent = super().forward
        return forward_with_rerun(self._merging, self.training, lambda images: parent(images, *args, **kwargs), x)


def forward_with_rerun(merging: Merging, training: bool, forward: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """``forward(images)`` merged, then unmerged again for the images whose prediction is uncertain.

    Only at inference: training needs every image's merged output. One host read decides it: how
    many images rerun, and from which block.
    """
    logits = forward(images)
    margin = merging.policy.rerun_margin
    if training or margin <= 0 or not merging.policy.merges:
        return logits
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            f"rerun_margin needs class logits [B, classes] from the model, got {type(logits).__name__} "
            f"{tuple(getattr(logits, 'shape', ()))}; set rerun_margin 0 for feature extractors"
        )
    trace, starts, merging.resume = merging.last, merging.resume or [], None
    uncertain = top2_gap(logits) < margin
    if not starts:  # no merge step ran: these are the dense logits
        merging.last = replace(trace, rerun=torch.zeros_like(uncertain))
        return logits
    # The number of uncertain images and the block to start from, read in one transfer.
    stride = len(starts) + 1
    count, first = divmod(int(uncertain.sum() * stride + _unmerged_steps(trace.counts, starts)), stride)
    if first == len(starts):  # no step merged anything: these are the dense logits
        merging.last = replace(trace, rerun=torch.zeros_like(uncertain))
        return logits
    if count:
        rows = (~uncertain).argsort(stable=True)[:count]  # the uncertain images, in order
        start = starts[first]
        with running_dense(merging, prefix_only=True, start=Resume(start.layer, start.tokens.images(rows))):
            dense = forward(images[:count])  # not read: the blocks start from the kept tokens
        logits = logits.index_copy(0, rows, dense if dense.dtype == logits.dtype else dense.to(logits.dtype))
    merging.last = replace(trace, rerun=uncertain)
    return logits


def _unmerged_steps(counts: tuple, starts: list[Resume]) -> Tensor | int:
    """How many of the steps at ``starts`` (the first merge steps of the forward, in order) merged
    nothing in any image: the index of the first that did, ``len(starts)`` if none. Counts only
    fall, so a step merged nothing exactly when every image still holds all its tokens after it."""
    full = counts[starts[0].layer]
    after = [counts[start.layer + 1] for start in starts]
    on_host = sum(1 for count in after if not isinstance(count, Tensor) and count == full)
    on_device = [count for count in after if isinstance(count, Tensor)]
    if not on_device:
        return on_host
    return (torch.stack(on_device).amin(dim=1) == full).sum() + on_host
