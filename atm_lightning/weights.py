"""Reading weights files and checkpoints, with errors that name the file and the fix.

A file is read by what it holds, not by its name: a ``.safetensors`` file renamed ``.pth`` loads
as safetensors (torch's unpickler stopped at it with a bare ``KeyError``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from .lora import fold_state_dict
from .merge import MERGERS

SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header, in bytes


def allow_merger_unpickling() -> None:
    """Let ``torch.load(weights_only=True)`` rebuild our merge policies (plain settings only).

    A checkpoint keeps the merger among its hyperparameters, and both this module and Lightning
    (``load_from_checkpoint``, resuming ``fit``) read checkpoints with ``weights_only=True``.
    Registered once, globally: a scoped ``safe_globals`` block would drop them again on exit.
    """
    torch.serialization.add_safe_globals(list(MERGERS.values()))


allow_merger_unpickling()


def is_safetensors(path: Path) -> bool:
    """The file starts as safetensors files do: an 8-byte header length, then a JSON object."""
    with path.open("rb") as file:
        head = file.read(9)
    if len(head) < 9:
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{"


CHECKPOINT = "a PyTorch checkpoint (.pth/.pt/.ckpt)"


def load_checkpoint(path: Path) -> object:
    """``torch.load`` restricted to tensors, plain data and this project's merger classes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise unreadable(path, CHECKPOINT, err) from err
        raise ValueError(
            f"{path} holds Python objects that torch.load(weights_only=True) will not create "
            f"({reason(err)}); save a plain state dict (torch.save(model.state_dict(), ...)) or a "
            f".safetensors file and pass that as --model.weights"
        ) from err
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError) as err:
        raise unreadable(path, CHECKPOINT, err) from err


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from ``model``/``state_dict`` keys."""
    if is_safetensors(path) or path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise unreadable(path, "a safetensors file", err) from err
    data = load_checkpoint(path)
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


def lightning_state_dict(path: Path) -> dict[str, Tensor] | None:
    """The timm state dict inside a checkpoint of this project's module, or None for other files;
    low-rank adapters of a distillation run folded into their weights (see :mod:`.lora`)."""
    if path.suffix == ".safetensors" or is_safetensors(path):
        return None
    data = load_checkpoint(path)
    if not (isinstance(data, dict) and "pytorch-lightning_version" in data):
        return None
    state = data.get("state_dict", {})
    if not state or not all(k.startswith("model.") for k in state):
        raise ValueError(
            f"{path} is a Lightning checkpoint but not of atm_lightning's TokenMergingModule "
            f"(its state_dict keys are not all under 'model.')"
        )
    return fold_state_dict({k.removeprefix("model."): v for k, v in state.items()})


def check_finite(state: dict[str, Tensor], path: Path) -> None:
    """Refuse weights holding NaN or inf: every output would be NaN, and an unmerged pass just as
    broken would agree with it perfectly."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(
            f"the weights in {path} hold NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}); the file "
            f"is damaged or comes from a diverged run: export it again or pass other --model.weights"
        )


def check_resume_checkpoint(ckpt_path: str | Path) -> None:
    """Before LightningCLI reads ``--ckpt_path`` for ``fit``: it must be a readable checkpoint of
    ``atm fit`` (a damaged one failed inside Lightning, naming neither the file nor the option)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        return  # Lightning's own names (last, best, ...), and its own error for a missing file
    if is_safetensors(path) or path.suffix == ".safetensors":
        raise ValueError(f"--ckpt_path {path} holds weights only; to start from them, pass --model.weights {path}")
    fix = "resume from another checkpoint (e.g. an earlier epoch's) or drop --ckpt_path to start afresh"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # whatever stops this load stops Lightning's next
        raise ValueError(
            f"cannot resume from --ckpt_path {path} ({type(err).__name__}: {reason(err).split('. ')[0]}); the file is "
            f"damaged, truncated or not a checkpoint of `atm fit`: {fix}"
        ) from err
    if not (isinstance(data, dict) and "state_dict" in data and "pytorch-lightning_version" in data):
        raise ValueError(
            f"--ckpt_path {path} is not a checkpoint of `atm fit` (no Lightning state); to start from "
            f"its weights, pass --model.weights {path}"
        )


def unreadable(path: Path, kind: str, err: BaseException) -> ValueError:
    text = reason(err)
    cause = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return ValueError(
        f"cannot read {path} as {kind} ({cause}); the file is damaged, truncated or of another "
        f"format: download or export it again, or fix --model.weights"
    )


def reason(err: BaseException) -> str:
    """The informative line of a library error (torch's unpickler puts it after a preamble)."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return first_line(text)


def first_line(err: BaseException | str) -> str:
    return (str(err).strip().splitlines() or [""])[0]
