"""How many kernels a forward launches, and how often it waits for the device.

On a GPU every operation is a kernel launch of a few microseconds, paid however little the kernel
computes; a small model at a modest batch is bound by launches, not arithmetic. On a GPU the
launches are read from ``torch.profiler``; on a CPU each ATen operation stands for one (what a
GPU would launch for it), counted with a ``TorchDispatchMode``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """ATen operations of the code run under it, and those that wait for the device (a host read).
    Views, reshapes, slices and dropout are not counted: they launch nothing of their own."""

    NOT_COUNTED = frozenset({
        "view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "expand", "expand_as", "t",
        "transpose", "permute", "unsqueeze", "squeeze", "alias", "detach", "as_strided", "unbind", "split",
        "split_with_sizes", "chunk", "narrow", "flatten", "unflatten", "view_as", "dropout", "lift_fresh",
        "resolve_conj", "resolve_neg",
    })  # fmt: skip
    HOST_READS = frozenset({"item", "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if name not in self.NOT_COUNTED:
            self.ops[name] += 1
        if name in self.HOST_READS or (name == "repeat_interleave" and kwargs.get("output_size") is None):
            self.host_reads += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(forward: Callable[[Tensor], object], images: Tensor) -> OpCounter:
    """The operations of one inference forward on ``images``, after one uncounted forward (which
    makes what the patch keeps once per shape)."""
    with torch.inference_mode():
        forward(images)
        with OpCounter() as counter:
            forward(images)
    return counter


def launches_per_forward(forward: Callable[[Tensor], object], images: Tensor) -> int:
    """Kernel launches of one inference forward: CUDA kernels from ``torch.profiler`` on a GPU,
    ATen operations (:class:`OpCounter`) elsewhere."""
    if images.device.type != "cuda":
        return count_ops(forward, images).total
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        forward(images)
        torch.cuda.synchronize(images.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward(images)
            torch.cuda.synchronize(images.device)
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    return sum(event.count for event in prof.key_averages() if event.key in names)
