"""Policies as users write them: method names with keywords, ``tome:r=8`` strings, config entries.

The one place that maps a policy to and from text and data:

- ``make_merger("tome", r=8)``: a method name (``none``/``dense``, ``tome``, ``atm``, ``evit``) and
  its settings, as ``patch(model, "tome", r=8)`` takes them;
- ``from_spec("tome:r=8")`` / ``to_spec(policy)``: one-line specs for command lines;
- ``from_config(entry)`` / ``to_config(policy)``: LightningCLI's ``class_path``/``init_args`` entry,
  as in ``configs/*.yaml`` (``from_config_file`` reads ``model.merger`` of such a file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .policies import ATM, NoMerge, TokenMerger, ToMe
from .pruning import EViT

MERGERS: dict[str, type[TokenMerger]] = {"none": NoMerge, "tome": ToMe, "atm": ATM, "evit": EViT}
ALIASES = {"dense": "none"}
CLASS_PATH_PREFIX = "atm_lightning.merge."
SPEC_HELP = (
    "NAME[:KEY=VALUE,...] with NAME dense, tome, atm or evit (e.g. 'tome:r=13', "
    "'atm:alpha=1.0,beta=0.03,theta_min=0.7,split_layer=10', 'evit:keep_rate=0.7'; lists as "
    "'tome:r=[8,8,...]')"
)


def make_merger(method: str | TokenMerger, **settings: Any) -> TokenMerger:
    """Build a policy from a method name and its keyword settings (or pass one through)."""
    if isinstance(method, TokenMerger):
        if settings:
            raise TypeError("pass settings either in the merger object or as keywords, not both")
        return method
    key = ALIASES.get(str(method).lower(), str(method).lower())
    if key not in MERGERS:
        raise ValueError(f"unknown merging method {method!r}; choose one of {sorted(MERGERS)}")
    cls = MERGERS[key]
    try:
        return cls(**settings)
    except TypeError as err:
        raise TypeError(f"{key}: {err}. Valid settings: {cls.settings()}") from None


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"tome:r=[1,2],prop_attn=false"`` -> ``("tome", {"r": [1, 2], "prop_attn": False})``.

    Values are read as YAML scalars or lists; commas inside brackets do not separate settings.
    """
    name, _, text = spec.partition(":")
    settings: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"cannot read {item!r} in {spec!r}; write settings as KEY=VALUE, e.g. 'tome:r=13'")
        settings[key.strip()] = yaml.safe_load(value.strip())
    return name.strip(), settings


def from_spec(spec: str) -> TokenMerger:
    """The policy of a ``NAME[:KEY=VALUE,...]`` spec; a mistake is a ValueError quoting the spec."""
    name, settings = parse_spec(spec)
    return build(name, settings, spec)


def build(name: str, settings: dict[str, Any], spec: str) -> TokenMerger:
    """:func:`make_merger` with errors that quote ``spec``, where the user wrote it."""
    if ALIASES.get(name.lower(), name.lower()) not in MERGERS:
        raise ValueError(f"unknown method {name!r} in {spec!r}; choose dense, tome, atm or evit (e.g. 'tome:r=13')")
    try:
        return make_merger(name, **settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad settings in {spec!r}: {err}") from None


def to_spec(merger: TokenMerger) -> str:
    """The spec :func:`from_spec` reads back as an equal policy (every setting written out)."""
    params = merger.params()
    method = "dense" if params.pop("method") == "none" else merger.name
    text = ",".join(f"{key}={_spec_value(value)}" for key, value in params.items())
    return f"{method}:{text}" if text else method


def to_config(merger: TokenMerger) -> dict[str, Any]:
    """The policy as a LightningCLI ``class_path``/``init_args`` entry, every setting explicit."""
    params = merger.params()
    params.pop("method")
    return {"class_path": CLASS_PATH_PREFIX + type(merger).__name__, "init_args": params}


def policy_class(class_path: str) -> type[TokenMerger] | None:
    """The policy class a config's ``class_path`` names (full path or class name), or None."""
    name = str(class_path).rsplit(".", 1)[-1]
    return next((cls for cls in MERGERS.values() if cls.__name__ == name), None)


def from_config(entry: Any, source: str = "the config") -> TokenMerger:
    """The policy of a ``{"class_path": ..., "init_args": {...}}`` entry."""
    if not isinstance(entry, dict) or "class_path" not in entry:
        raise ValueError(f"{source} has no model.merger.class_path; give the method inline, e.g. 'tome:r=13'")
    cls = policy_class(entry["class_path"])
    if cls is None:
        names = sorted(c.__name__ for c in MERGERS.values())
        raise ValueError(f"{source}: merger {entry['class_path']!r} is not one of {names}")
    return cls(**(entry.get("init_args") or {}))


def from_config_file(path: str | Path) -> TokenMerger:
    """The policy of a project config file (its ``model.merger``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist; pass a file from configs/ or an inline method")
    config = yaml.safe_load(path.read_text()) or {}
    return from_config((config.get("model") or {}).get("merger"), str(path))


def _spec_value(value: Any) -> str:
    """A setting as :func:`parse_spec` reads it back: YAML flow style without spaces."""
    if isinstance(value, str) and value.isidentifier():
        return value
    return json.dumps(value, separators=(",", ":"))


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so per-block lists survive: ``r=[1,2],prop_attn=false``."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]
