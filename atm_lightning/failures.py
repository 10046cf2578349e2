"""Make the first real error of a multi-process run the last thing it prints.

Under DDP a rank that fails takes its peers down with errors such as "Connection closed by peer",
whose tracebacks bury the cause dozens of lines up. So every failing rank writes a one-line
summary into a folder all ranks know (its path travels in an environment variable, which the
launcher passes on to the processes it starts), and the first process, after its own traceback,
prints them all, earliest first:

    rank 1 failed first: ValueError: cannot read image /data/val/x.JPEG (...)
    rank 0 failed: RuntimeError: ... Connection closed by peer
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch.distributed as dist

FOLDER_ENV = "ATM_FAILURES_DIR"


@contextmanager
def failure_summary() -> Iterator[None]:
    """Record an exception escaping the block in a multi-process run; the first process prints
    every rank's summary at exit, after its traceback."""
    owner = FOLDER_ENV not in os.environ
    if owner:
        os.environ[FOLDER_ENV] = str(Path(tempfile.gettempdir()) / f"atm-failures-{uuid.uuid4().hex}")
    folder = Path(os.environ[FOLDER_ENV])
    report_at_exit = False
    try:
        yield
    except Exception as err:
        rank = rank_label()
        if rank is not None:
            record(folder, rank, err)
            report_at_exit = owner
        raise
    finally:
        if owner:
            os.environ.pop(FOLDER_ENV, None)
            if report_at_exit:
                atexit.register(print_summaries, folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)


def rank_label() -> str | None:
    """This process's rank in a multi-process run, or None when it runs alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return str(dist.get_rank())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if "RANK" in os.environ:
        return os.environ["RANK"]
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    return local if node == "0" else f"{local} of node {node}"


def record(folder: Path, rank: str, err: BaseException) -> None:
    """Write this rank's one-line summary; never let reporting hide the error itself."""
    message = (str(err).strip().splitlines() or [""])[0]
    error = f"{type(err).__name__}: {message}" if message else type(err).__name__
    summary = {"rank": rank, "time": time.time(), "error": error}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{uuid.uuid4().hex}.json").write_text(json.dumps(summary))
    except OSError:
        pass


def print_summaries(folder: Path, file: TextIO | None = None) -> None:
    """Every recorded failure, earliest first, then remove the folder."""
    summaries = []
    for path in folder.glob("rank-*.json"):
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    shutil.rmtree(folder, ignore_errors=True)
    summaries.sort(key=lambda s: s["time"])
    for i, summary in enumerate(summaries):
        first = " first" if i == 0 and len(summaries) > 1 else ""
        print(f"rank {summary['rank']} failed{first}: {summary['error']}", file=file or sys.stderr)
