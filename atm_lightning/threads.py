"""How many intra-op threads the main process runs next to its DataLoader workers.

On a small CPU machine every core counts twice: a worker decoding JPEGs and torch's intra-op
threads compete for it, and OpenMP threads that wait for a busy core spin instead of yielding.
With more threads than free cores a forward that runs many small ops (token merging at small
batches) can slow down several times over, so the default leaves the workers their cores.
"""

from __future__ import annotations

import os

import torch


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(workers: int, devices: int = 1) -> int:
    """Threads per process: this node's cores shared among its ``devices`` processes, less the
    ``workers`` each one feeds from; at least 1."""
    return max(1, available_cpus() // max(1, devices) - workers)


def set_threads(threads: int | None, workers: int, devices: int = 1) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); returns the number set."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the cores the DataLoader workers leave), got {threads}")
    count = default_threads(workers, devices) if threads is None else threads
    torch.set_num_threads(count)
    return count
