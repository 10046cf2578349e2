"""Peak memory of one pass, and the glibc allocator setting that keeps CPU timings about the model.

On CPU the peak is the rise of the process's resident set (sampled in a thread), on CUDA torch's
own counter. Before timing, ``atm benchmark`` makes glibc keep freed memory (``--malloc keep``):
otherwise every forward page-faults its >32 MiB activations in afresh, which measures the VM.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")
MALLOC_MODES = ("keep", "default")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory while ``run()`` runs, above the level before it, in MiB (None where unmeasurable)."""
    if device.type == "cuda":
        return cuda_peak_mb(run, device)
    return rss_peak_mb(run) if _STATM.exists() else None


def cuda_peak_mb(run: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rss_peak_mb(run: Callable[[], object]) -> float:
    """Resident set size sampled every millisecond in a thread (may miss shorter spikes)."""
    release_freed_memory()
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return (peak[0] - before) / 2**20


def rss_bytes() -> int:
    """Current resident set size. Unlike ``ru_maxrss``, a lifetime high-water mark that cannot
    show the peak of a method measured after a hungrier one, it can be sampled around one pass."""
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for large blocks, no trimming of the heap.

    By default glibc maps every block over 32 MiB (ViT activations at batch 64) afresh and unmaps
    it when freed, so each forward page-faults its activations in again; how much that costs
    depends on the VM, not on the model, and it would drown the differences being measured.
    Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); otherwise memory freed by the
    previous method stays resident and hides this method's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise may read low
        pass


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak mem: torch.cuda.max_memory_allocated during one pass, minus memory allocated before it"
    return (
        "peak mem: CPU resident set size during one pass (/proc/self/statm sampled every 1 ms), "
        "minus RSS before it (after malloc_trim)"
    )


