"""Mistakes a user can fix end as one ``error:`` line and exit status 1, not a traceback.

The project's messages name the fix; below a 60-line traceback nobody reads them. An error
counts as the user's when it is one this project raises for a setting, a file or an image
(a ValueError or a file error raised in this package's code, an :class:`UnsupportedModelError`,
a :class:`CommandError`) or Lightning's refusal of a trainer setting. Anything else is a bug
and keeps its traceback. ``ATM_DEBUG=1`` or ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException

from .patch import UnsupportedModelError

DEBUG_ENV = "ATM_DEBUG"
DEBUG_FLAG = "--debug"
# Raised in this package's code, these are its messages about settings, files and images.
OWN_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
PACKAGE = Path(__file__).resolve().parent
TOOLS = PACKAGE.parent / "tools"
# torch re-raises a DataLoader worker's exception with the worker's traceback in the message.
WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.")

class CommandError(RuntimeError):
    """A run that cannot give a valid result, for a reason the message names and the user can fix."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; the flag sets ATM_DEBUG=1, which DDP ranks inherit."""
    if DEBUG_FLAG not in argv:
        return argv
    os.environ[DEBUG_ENV] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


def user_message(err: BaseException) -> str | None:
    """The message to show for a user's mistake, or None when ``err`` is not one."""
    if isinstance(err, (UnsupportedModelError, CommandError, MisconfigurationException)):
        return str(err)
    if not isinstance(err, OWN_ERRORS):
        return None
    text = str(err)
    worker = WORKER_ERROR.match(text)
    if worker:  # the original error is the last line of the worker's traceback
        frames = re.findall(r'File "([^"]+)"', text)
        last = text.strip().splitlines()[-1]
        if frames and _ours(frames[-1]) and last.startswith(worker.group(1) + ":"):
            return last.split(":", 1)[1].strip()
        return None
    frames = traceback.extract_tb(err.__traceback__)
    return text if frames and _ours(frames[-1].filename) else None


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return path.is_relative_to(PACKAGE) or path.is_relative_to(TOOLS)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a user's mistake escaping the block into ``error: MESSAGE`` on stderr and exit 1."""
    try:
        yield
    except Exception as err:
        message = user_message(err)
        if message is None or debugging():
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
