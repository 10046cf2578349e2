"""Build a timm model by name, with weights from a local file, and errors that name the fix.

Evaluation loads weights here rather than through ``--ckpt_path``: in LightningCLI a checkpoint's
saved hyperparameters silently override the merge settings given on the command line.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import Tensor, nn

from .merge import MERGERS

_WIDTH_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def create_model(
    model_name: str,
    pretrained: bool = False,
    weights: str | None = None,
    num_classes: int = 1000,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm model, randomly initialised, from timm's hub cache, or from a local weights file.

    Args:
        model_name: timm architecture name, e.g. ``deit_tiny_patch16_224``.
        pretrained: load timm's published weights (needs the network or a filled hub cache);
            ignored when ``weights`` is given.
        weights: local file: ``.safetensors``, a ``.pth``/``.pt`` state dict (bare, or under a
            ``model``/``state_dict`` key), or a checkpoint written by ``atm fit``.
        num_classes: classifier size; timm files with another head get a fresh one.
        model_kwargs: further timm constructor arguments, e.g. ``img_size``, ``patch_size``, ``depth``
            for a small ViT trained from scratch.
    """
    check_model_name(model_name)
    kwargs = model_kwargs or {}
    if weights is None:
        return _from_timm(model_name, pretrained, num_classes, kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (check --model.weights)")
    state = _lightning_state_dict(path)
    if state is not None:
        model = timm.create_model(model_name, num_classes=num_classes, **kwargs)
        _check_shapes(model, state, path, model_name)
        model.load_state_dict(state, strict=True)
        return model
    state = _read_state_dict(path)
    # timm resets the head when num_classes differs from the *config's* class count, so tell it
    # the file's: a 10-class file then loads its head into a 10-class model.
    overlay = {"file": str(path)}
    head = state.get("head.weight")
    if head is not None and head.ndim == 2:
        overlay["num_classes"] = head.shape[0]
    try:
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
        )
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise ValueError(_mismatch_message(state, path, model_name)) from None


def check_model_name(model_name: str) -> None:
    """Raise ValueError with the closest timm names when ``model_name`` is not a timm model."""
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ValueError(f"unknown timm model {model_name!r}{hint}")


def _from_timm(model_name: str, pretrained: bool, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not fetch pretrained weights for {model_name} ({type(err).__name__}); offline or "
            f"without a hub cache, pass --model.weights with a local .safetensors/.pth file"
        ) from err


def allow_merger_unpickling() -> None:
    """Let ``torch.load(weights_only=True)`` rebuild our merge policies (plain settings only).

    A checkpoint keeps the merger among its hyperparameters, and both this module and Lightning
    (``load_from_checkpoint``, resuming ``fit``) read checkpoints with ``weights_only=True``.
    Registered once, globally: a scoped ``safe_globals`` block would drop them again on exit.
    """
    torch.serialization.add_safe_globals(list(MERGERS.values()))


allow_merger_unpickling()


def _load(path: Path) -> object:
    """``torch.load`` restricted to tensors, plain data and this project's merger classes."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from ``model``/``state_dict`` keys."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = _load(path)
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    return data


def _lightning_state_dict(path: Path) -> dict[str, Tensor] | None:
    """The timm state dict inside a checkpoint of this project's module, or None for other files."""
    if path.suffix == ".safetensors":
        return None
    data = _load(path)
    if not (isinstance(data, dict) and "pytorch-lightning_version" in data):
        return None
    state = data.get("state_dict", {})
    if not state or not all(k.startswith("model.") for k in state):
        raise ValueError(
            f"{path} is a Lightning checkpoint but not of atm_lightning's TokenMergingModule "
            f"(its state_dict keys are not all under 'model.')"
        )
    return {k.removeprefix("model."): v for k, v in state.items()}


def _check_shapes(model: nn.Module, state: dict[str, Tensor], path: Path, model_name: str) -> None:
    expected = model.state_dict()
    if any(k in expected and expected[k].shape != v.shape for k, v in state.items()):
        raise ValueError(_mismatch_message(state, path, model_name, model))


class _Arch(NamedTuple):
    """Architecture read off tensor shapes, to say what a weights file was made for."""

    width: int
    patch: int
    depth: int
    classes: int | None

    @classmethod
    def of(cls, state: dict[str, Tensor]) -> _Arch | None:
        proj = state.get("patch_embed.proj.weight")
        if proj is None:
            return None
        head = state.get("head.weight")
        depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        return cls(proj.shape[0], proj.shape[-1], depth, head.shape[0] if head is not None else None)

    def __str__(self) -> str:
        size = _WIDTH_NAMES.get(self.width, f"width-{self.width}")
        classes = f"{self.classes} classes" if self.classes is not None else "no head"
        return f"a ViT-{size}/{self.patch} (width {self.width}, {self.depth} blocks, {classes})"


def _mismatch_message(
    state: dict[str, Tensor], path: Path, model_name: str, model: nn.Module | None = None
) -> str:
    model = model if model is not None else timm.create_model(model_name)
    found, wanted = _Arch.of(state), _Arch.of(model.state_dict())
    if found is None:
        return f"weights in {path} are not a timm ViT ({len(state)} tensors, no patch_embed.proj.weight)"
    hint = "pick the matching --model.model_name, or other weights"
    if wanted is not None and found[:3] == wanted[:3]:
        hint = f"set --model.num_classes {found.classes}"
    return f"weights in {path} do not fit {model_name}: the file looks like {found}, but {model_name} is {wanted}; {hint}"
