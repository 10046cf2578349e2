"""A merger class named on the command line starts from its own defaults.

jsonargparse keeps the settings a new ``class_path`` shares with the one it replaces, so
``--config vit_t_atm_40.yaml --model.merger ToMe`` would run ToMe with the ATM point's calibrated
``rerun_margin`` and ``last_block_prefix_only``: a row labelled ToMe that is not the paper's ToMe.
Here the settings of a class switched to on the command line are its defaults, except those given
after the switch (``--model.merger ToMe --model.merger.rerun_margin 0.1``).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from .merge import MERGERS

SWITCH = "--model.merger"
BY_NAME = {cls.__name__: cls for cls in MERGERS.values()}


def merger_switch(argv: list[str]) -> tuple[list[str], str, set[str]] | None:
    """For the last ``--model.merger CLASS`` of ``argv`` (a class name or path, not a mapping):
    ``argv`` without it and the merger settings after it, the class name, and those settings' names."""
    position, name, width = None, None, 0
    for i, arg in enumerate(argv):
        if arg.startswith(SWITCH + "="):
            value, span = arg.split("=", 1)[1], 1
        elif arg == SWITCH and i + 1 < len(argv):
            value, span = argv[i + 1], 2
        else:
            continue
        if not value.lstrip().startswith("{"):  # a mapping gives every setting itself
            position, name, width = i, value.rsplit(".", 1)[-1], span
    if position is None:
        return None
    before, after = argv[:position], argv[position + width :]
    explicit, rest, skip = set(), [], False
    for arg in after:
        if skip:
            skip = False
            continue
        if arg.startswith(SWITCH + "."):
            key = arg[len(SWITCH) + 1 :].split("=", 1)[0]
            explicit.add(key.removeprefix("init_args.").rstrip("+"))
            skip = "=" not in arg
            continue
        rest.append(arg)
    return before + rest, name, explicit


def own_defaults(class_name: str, init_args: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """``init_args`` with every setting not in ``explicit`` at ``class_name``'s default (classes
    this package does not define are left as they are)."""
    cls = BY_NAME.get(class_name)
    if cls is None:
        return init_args
    defaults = {f.name: f.default for f in fields(cls) if f.init and f.default is not MISSING}
    return {key: value if key in explicit or key not in defaults else defaults[key] for key, value in init_args.items()}
