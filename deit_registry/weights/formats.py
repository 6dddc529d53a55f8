"""Read a checkpoint file or folder into a flat state dict, detecting the format from the bytes, not the name.

* ``.safetensors`` - memory-mapped, never runs code;
* zip-serialised torch files (``.pth``/``.bin``, the official checkpoints) and legacy pickles - with
  ``torch.load(weights_only=True)`` (memory-mapped for zip files), which refuses any pickle that would run code;
* a folder - its ``model.safetensors`` (preferred) or ``pytorch_model.bin`` / ``*.pth``, plus ``config.json``
  (transformers' or timm's) when present;
* wrappers - the official files keep the weights under ``model``; training checkpoints of the original
  repository also carry ``optimizer``, ``lr_scheduler``, ``model_ema``, ``args``...: ``model`` is used, or
  ``model_ema`` with ``ema=True``. A ``module.`` prefix (DistributedDataParallel) is removed.

::

    from deit_registry.weights.formats import read_checkpoint
    ckpt = read_checkpoint("deit_small_patch16_224-cd65a155.pth")
    ckpt.state_dict["pos_embed"].shape, ckpt.format          # torch.Size([1, 197, 384]), 'torch-zip'
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError

FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


@dataclass
class Checkpoint:
    """A state dict read from ``file``, with the ``config.json`` found beside it (if any)."""

    state_dict: dict[str, torch.Tensor]
    file: Path
    format: str  # "safetensors", "torch-zip" or "torch-legacy"
    config: dict[str, Any] | None = None
    extra_keys: list[str] = field(
        default_factory=list
    )  # top-level entries besides the weights (optimizer, ...)


def find_weights_file(folder: Path) -> Path:
    """The weights file of a checkpoint folder (safetensors first)."""
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = (
        sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth")) + sorted(folder.glob("*.bin"))
    )
    if len(candidates) == 1:
        return candidates[0]
    if (folder / "model.safetensors.index.json").is_file() or (
        folder / "pytorch_model.bin.index.json"
    ).is_file():
        raise CorruptCheckpointError(
            f"{folder} holds a sharded checkpoint, which no DeiT needs. Re-save it unsharded "
            f"(save_pretrained(..., max_shard_size='10GB') in transformers)"
        )
    found = ", ".join(p.name for p in candidates) or "no weights file"
    raise CheckpointNotFoundError(
        f"{folder} has {found}; expected one of {', '.join(FOLDER_WEIGHT_FILES)}. Pass the weights file itself"
    )


def read_checkpoint(path: str | Path, ema: bool = False) -> Checkpoint:
    """Read the weights at ``path`` (a file or folder); see the module docstring."""
    path = Path(path)
    config = None
    if path.is_dir():
        folder, file = path, find_weights_file(path)
    else:
        folder, file = path.parent, path
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
    fmt = sniff_format(file)
    raw = _read_safetensors(file) if fmt == "safetensors" else _read_torch(file, fmt)
    state_dict, extra = unwrap(raw, file, ema)
    return Checkpoint(state_dict, file, fmt, config, extra)


def sniff_format(file: Path) -> str:
    """``safetensors``, ``torch-zip`` or ``torch-legacy`` from the first bytes of ``file``."""
    try:
        with open(file, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointNotFoundError(f"cannot read checkpoint {file}: {e}") from e
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and header_len < (1 << 30):
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save(_use_new_zipfile_serialization=False)
        return "torch-legacy"
    raise CorruptCheckpointError(
        f"{file} is neither a safetensors file nor a torch checkpoint (first bytes {head[:8]!r}); it may be "
        f"truncated or an HTML error page. Delete it and download it again"
    )


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{file} is not valid JSON ({e}); fix or delete it") from e
    return data if isinstance(data, dict) else None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))  # memory-mapped; tensors are copied out lazily by the OS
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{file} is a damaged or truncated safetensors file ({e}). Delete it and download it again"
        ) from e


def _read_torch(file: Path, fmt: str) -> Any:
    import argparse

    # The original repository stores its argparse.Namespace under "args": allow that one plain class, nothing
    # else; weights_only=True refuses every other global, so no code from the file ever runs.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if fmt == "torch-zip":
                try:  # memory-mapped: the model's parameters are then the file's pages, never a second copy
                    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # e.g. a filesystem without mmap; a damaged file fails again below
                    pass
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UnsafeCheckpointError(
                f"{file} contains pickled objects that would run code or build arbitrary classes when loaded, "
                f"so it was refused and nothing in it was executed. Use a .safetensors copy; if you trust the "
                f"file, load it yourself with torch.load(weights_only=False) and pass model.state_dict() data "
                f"through load_checkpoint(model, state_dict)"
            ) from e
        raise _corrupt(file, e) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, struct.error) as e:
        raise _corrupt(file, e) from e


def _corrupt(file: Path, e: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{file} is a damaged or truncated torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        f"Delete it and download it again"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(raw: Any, file: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat state dict inside ``raw`` (``model``/``model_ema``/``state_dict`` wrappers removed)."""
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(
            f"{file} holds a {type(raw).__name__}, not a state dict; save model.state_dict() instead of the model"
        )
    extra: list[str] = []
    if ema:
        if not _is_state_dict(raw.get("model_ema")):
            raise CorruptCheckpointError(
                f"{file} has no 'model_ema' weights (top-level keys: {sorted(map(str, raw))[:10]}); drop ema=True"
            )
        extra = [k for k in raw if k != "model_ema"]
        raw = raw["model_ema"]
    elif not _is_state_dict(raw):
        for key in WRAPPER_KEYS:
            if _is_state_dict(raw.get(key)):
                extra = [k for k in raw if k != key]
                raw = raw[key]
                break
    # Non-tensor entries (e.g. timm's or transformers' metadata) are no weights.
    state_dict = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CorruptCheckpointError(
            f"{file} holds no tensors under {', '.join(WRAPPER_KEYS)} or at the top level (keys: "
            f"{sorted(map(str, raw))[:10]}); it is not a model checkpoint"
        )
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict, extra
