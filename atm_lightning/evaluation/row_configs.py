"""A config given as a row of ``atm compare`` must be for the model and images every row runs.

compare takes only the merger from a row's config: every row runs the base ``--config``'s model
and preprocessing, so that all rows see the same images. A row config made for another model or
crop would run anyway, under its own name, on the base model at the base crop; refused here.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from ..data.transforms import resolve_eval_config
from ..module import TokenMergingModule

PREPROCESSING = ("crop_pct", "interpolation", "mean", "std", "img_size")
DEFAULT_MODEL = inspect.signature(TokenMergingModule).parameters["model_name"].default


def check_row_config(spec: str, base: str, passthrough: list[str]) -> None:
    """Refuse a ``--atm CONFIG.yaml[:...]`` whose model or eval preprocessing differs from ``base``'s,
    both with the options that every row gets (``passthrough``)."""
    path, dot, _ = spec.partition(".yaml")
    if not dot:
        path, dot, _ = spec.partition(".yml")
    if not dot or not Path(path + dot).is_file():
        return  # an inline method (tome:r=8), or a missing file parse_method names
    row_file = path + dot
    mine, theirs = run_settings(row_file, passthrough), run_settings(base, passthrough)
    differ = [key for key in mine if mine[key] != theirs[key]]
    if differ:
        detail = ", ".join(f"{key} {mine[key]} (every row: {theirs[key]})" for key in differ)
        raise ValueError(
            f"--atm {row_file} is made for other images or another model than --config {base}: {detail}. "
            f"compare takes only the merger from a row's config and runs every row as --config sets up; "
            f"compare it with a --config of its own model and preprocessing, or drop it"
        )


def run_settings(config: str, passthrough: list[str]) -> dict[str, Any]:
    """The model and eval preprocessing ``config`` sets up, with ``passthrough``'s model and data options."""
    text = yaml.safe_load(Path(config).read_text()) or {}
    model = {**(text.get("model") or {}), **given_options(passthrough, "model")}
    data = {**(text.get("data") or {}), **given_options(passthrough, "data")}
    name = model.get("model_name") or DEFAULT_MODEL
    resolved = resolve_eval_config(name, **{key: data.get(key) for key in PREPROCESSING})
    settings = {"model": name, "model_kwargs": model.get("model_kwargs") or {}}
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std"):
        value = resolved[key]
        settings[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return settings


def given_options(argv: list[str], group: str) -> dict[str, Any]:
    """``--GROUP.KEY VALUE`` and ``--GROUP.KEY=VALUE`` of ``argv`` as ``{KEY: VALUE}`` (YAML values)."""
    prefix = f"--{group}."
    options = {}
    for i, arg in enumerate(argv):
        if not arg.startswith(prefix):
            continue
        name, equals, value = arg.partition("=")
        if not equals:
            if i + 1 >= len(argv):
                continue
            value = argv[i + 1]
        key = name[len(prefix):]
        if "." not in key:
            options[key] = yaml.safe_load(value)
    return options
