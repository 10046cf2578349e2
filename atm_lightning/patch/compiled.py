"""torch.compile for patched ViTs: each block, merge step included, as compiled code.

:func:`.loop.run_block` (attention residual, merge step, MLP residual) is compiled with dynamic
token and image counts. Where images merge different counts the step reads the new padded width
on the host, and the compiled block splits there into two graphs: one graph break per merging
block. Each block compiles once per kind of input it sees (before and after the first merge, one
image or several); after that, batches whose images keep other token counts reuse the graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from .loop import run_block


def backend_of(compile: bool | str) -> str:
    """The ``torch.compile`` backend a ``compile`` setting names (True: the default, inductor)."""
    return "inductor" if compile is True else str(compile)


@cache
def compiled_block(backend: str) -> Callable:
    """:func:`.loop.run_block` compiled with ``backend`` (made once per backend and shared by every
    model, which keeps the compiled graphs across re-patching)."""
    return torch.compile(run_block, dynamic=True, backend=backend)
