"""Build a timm model by name, with weights from a local file, and errors that name the fix.

Evaluation loads weights here rather than through ``--ckpt_path``: in LightningCLI a checkpoint's
saved hyperparameters silently override the merge settings given on the command line.
"""

from __future__ import annotations

import difflib
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import Tensor, nn

from .lora import fold_state_dict
from .merge import MERGERS

_WIDTH_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def create_model(
    model_name: str,
    pretrained: bool = False,
    weights: str | None = None,
    num_classes: int | None = 1000,
    model_kwargs: dict[str, Any] | None = None,
    new_head: bool = False,
) -> nn.Module:
    """A timm model, randomly initialised, from timm's hub cache, or from a local weights file.

    Args:
        model_name: timm architecture name, e.g. ``deit_tiny_patch16_224``.
        pretrained: load timm's published weights (needs the network or a hub cache); ignored
            when ``weights`` is given.
        weights: local file: ``.safetensors``, a ``.pth``/``.pt`` state dict (bare, or under a
            ``model``/``state_dict`` key), or a checkpoint written by ``atm fit``.
        num_classes: classifier size. With weights it must equal theirs (a random head would
            report chance accuracy as a result) unless ``new_head``; None takes the weights' own.
        model_kwargs: further timm constructor arguments, e.g. ``img_size``, ``patch_size``, ``depth``
            for a small ViT trained from scratch.
        new_head: replace the weights' classifier with a new, randomly initialised one of
            ``num_classes`` outputs, to fine-tune to another label set.
    """
    check_model_name(model_name)
    kwargs = model_kwargs or {}
    if new_head and num_classes is None:
        raise ValueError("a new head needs its number of classes; set num_classes")
    if weights is None and not pretrained:
        classes = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(model_name, **classes, **kwargs)
    if weights is None:
        found = _pretrained_classes(model_name)  # None: timm has no weights for it, and will say so
        source = f"timm's pretrained weights of {model_name}"
        classes = num_classes if found is None else _classes_to_load(found, num_classes, new_head, source)
        model = _from_timm(model_name, classes, kwargs)
    else:
        model = _from_file(model_name, Path(weights).expanduser(), num_classes, new_head, kwargs)
    if new_head:
        _replace_head(model, num_classes)
    return model


def _from_file(
    model_name: str, path: Path, num_classes: int | None, new_head: bool, kwargs: dict[str, Any]
) -> nn.Module:
    """The model with the file's weights, classifier included, exactly as they are."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (check --model.weights)")
    state = _lightning_state_dict(path)
    if state is not None:
        classes = _classes_to_load(_head_classes(state), num_classes, new_head, f"the weights in {path}")
        model = timm.create_model(model_name, num_classes=classes, **kwargs)
        _check_shapes(model, state, path, model_name)
        _load_into(model, state, path)
        return model
    state = _read_state_dict(path)
    classes = _classes_to_load(_head_classes(state), num_classes, new_head, f"the weights in {path}")
    # timm resets the head when num_classes differs from the *config's* class count, so tell it
    # the file's: a 10-class file then loads its head into a 10-class model, strictly.
    overlay = {"file": str(path), "num_classes": classes}
    try:
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=classes, **kwargs
        )
    except RuntimeError as err:
        if "size mismatch" in str(err) or "Missing key(s)" in str(err):
            model = timm.create_model(model_name, num_classes=classes, **kwargs)  # what the settings build
            raise ValueError(_mismatch_message(state, path, model_name, model)) from None
        raise ValueError(f"the weights in {path} do not load into {model_name}: {_first_line(err)}") from err


def _head_classes(state: dict[str, Tensor]) -> int | None:
    """Outputs of the classifier in a timm state dict; None when it has none."""
    head = state.get("head.weight")
    return head.shape[0] if head is not None and head.ndim == 2 else None


def _pretrained_classes(model_name: str) -> int | None:
    cfg = timm.models.get_pretrained_cfg(model_name)
    return cfg.num_classes if cfg is not None else None


def _classes_to_load(found: int | None, num_classes: int | None, new_head: bool, source: str) -> int:
    """The classifier size that loads ``source`` exactly: its own, if the caller may have it.

    Loading a file with another head size would need a fresh random head, which reports chance
    accuracy as a result; that takes an explicit ``new_head``.
    """
    if new_head or num_classes is None or found == num_classes:
        return found or 0
    if found is None:
        raise ValueError(
            f"{source} have no classifier (no head.weight), but --model.num_classes is {num_classes}; "
            f"to fine-tune a new {num_classes}-class head on them pass --model.new_head true"
        )
    raise ValueError(
        f"{source} have a {found}-class classifier but --model.num_classes is {num_classes}; "
        f"pass --model.num_classes {found} to use it, or --model.new_head true to replace it with "
        f"a new, untrained {num_classes}-class head for fine-tuning to another label set"
    )


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A new classifier of ``num_classes`` outputs, initialised as timm initialises a new ViT's."""
    model.reset_classifier(num_classes)
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)


def check_input_size(model: nn.Module, input_size: tuple[int, int], model_name: str) -> None:
    """Refuse, before any image is read, images of a size the model was not built for (timm would
    stop at the first batch with its own assertion, which does not say what to change)."""
    embed = getattr(model, "patch_embed", None)
    built = getattr(embed, "img_size", None)
    if built is None or getattr(model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return
    if tuple(input_size) != tuple(built):
        (height, width), (built_h, built_w) = input_size, built
        raise ValueError(
            f"the data gives {height}x{width} images but {model_name} was built for {built_h}x{built_w}: "
            f"set --model.model_kwargs '{{img_size: {height}}}' (timm resamples the position embedding) "
            f"or --data.img_size {built_h}"
        )


def check_model_name(model_name: str) -> None:
    """Raise ValueError with the closest timm names when ``model_name`` is not a timm model."""
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ValueError(f"unknown timm model {model_name!r}{hint}")


def _from_timm(model_name: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    classes = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(model_name, pretrained=True, **classes, **kwargs)
    except (OSError, RuntimeError) as err:
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise _unreadable(path, "a PyTorch checkpoint (.pth/.pt/.ckpt)", err) from err
        raise ValueError(
            f"{path} holds Python objects that torch.load(weights_only=True) will not create "
            f"({_reason(err)}); save a plain state dict (torch.save(model.state_dict(), ...)) or a "
            f".safetensors file and pass that as --model.weights"
        ) from err
    except (RuntimeError, OSError, EOFError) as err:
        raise _unreadable(path, "a PyTorch checkpoint (.pth/.pt/.ckpt)", err) from err


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from ``model``/``state_dict`` keys."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise _unreadable(path, "a safetensors file", err) from err
    data = _load(path)
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not any(isinstance(v, Tensor) for v in data.values()):
        keys = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path} holds no state dict of tensors (found {keys}); pass a file saved with "
            f"torch.save(model.state_dict(), ...), a .safetensors file or an `atm fit` checkpoint"
        )
    return data


def _unreadable(path: Path, kind: str, err: BaseException) -> ValueError:
    reason = _reason(err)
    cause = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return ValueError(
        f"cannot read {path} as {kind} ({cause}); the file is damaged, truncated or of another "
        f"format: download or export it again, or fix --model.weights"
    )


def _reason(err: BaseException) -> str:
    """The informative line of a library error (torch's unpickler puts it after a preamble)."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(text)


def _first_line(err: BaseException | str) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _lightning_state_dict(path: Path) -> dict[str, Tensor] | None:
    """The timm state dict inside a checkpoint of this project's module, or None for other files;
    low-rank adapters of a distillation run folded into their weights (see :mod:`.lora`)."""
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
    return fold_state_dict({k.removeprefix("model."): v for k, v in state.items()})


def _check_shapes(model: nn.Module, state: dict[str, Tensor], path: Path, model_name: str) -> None:
    expected = model.state_dict()
    found, wanted = _Arch.of(state), _Arch.of(expected)
    other_depth = found is not None and wanted is not None and found.depth != wanted.depth
    if other_depth or any(k in expected and expected[k].shape != v.shape for k, v in state.items()):
        raise ValueError(_mismatch_message(state, path, model_name, model))


def _load_into(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not load into the model: {_first_line(err)}") from err


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
    if wanted is not None and found[:2] == wanted[:2] and found.depth != wanted.depth:
        hint = f"set --model.model_kwargs '{{depth: {found.depth}}}' (as the weights were trained), or other weights"
    elif wanted is not None and found[:3] == wanted[:3]:
        hint = f"set --model.num_classes {found.classes}"
    return f"weights in {path} do not fit {model_name}: the file looks like {found}, but {model_name} is {wanted}; {hint}"
