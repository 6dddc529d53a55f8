"""Read a checkpoint file or folder into a flat state dict, detecting the format from the bytes, not the name.

* ``.safetensors`` - each tensor's bytes are read straight into a tensor the caller owns (no memory map, so
  rewriting or truncating the file later cannot change or crash a loaded model), never runs code;
* zip-serialised torch files (``.pth``/``.bin``, the official checkpoints) and legacy pickles - with
  ``torch.load(weights_only=True, mmap=False)``, which refuses any pickle that would run code; a pickle cut
  short is reported as corrupt, not as unsafe; a zip member whose CRC-32 fails (a flipped bit) too;
* a folder - its ``model.safetensors`` (preferred) or ``pytorch_model.bin`` / ``*.pth``, plus ``config.json``
  (transformers' or timm's) when present;
* wrappers - the official files keep the weights under ``model``; training checkpoints of the original
  repository also carry ``optimizer``, ``lr_scheduler``, ``model_ema``, ``args``...: ``model`` is used, or
  ``model_ema`` with ``ema=True``; timm's ``train.py`` saves ``state_dict`` and ``state_dict_ema``. A
  ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``) prefix is removed.

::

    from deit_registry.weights.formats import read_checkpoint
    ckpt = read_checkpoint("deit_small_patch16_224-cd65a155.pth")
    ckpt.state_dict["pos_embed"].shape, ckpt.format          # torch.Size([1, 197, 384]), 'torch-zip'
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    CheckpointNotFoundError,
    CheckpointNotReadableError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

# The one list of weight file names, best first (safetensors: no pickle, no code).
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
# Where EMA weights live: the original repository's training checkpoints, then timm's train.py.
EMA_KEYS = ("model_ema", "state_dict_ema")


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
    """The weights file of a checkpoint folder (:data:`WEIGHT_FILE_NAMES` first)."""
    _check_readable(folder)
    for name in WEIGHT_FILE_NAMES:
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
        f"{folder} has {found}; expected one of {', '.join(WEIGHT_FILE_NAMES)}. Pass the weights file itself"
    )


def _check_readable(path: Path) -> None:
    """CheckpointNotFoundError naming the permission problem (``is_file``/``glob`` would just see nothing)."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError as e:
        raise _unreadable(e.filename or path) from e
    except OSError as e:
        raise CheckpointNotFoundError(f"cannot read checkpoint {path}: {e}") from e


def read_checkpoint(path: str | Path, ema: bool = False) -> Checkpoint:
    """Read the weights at ``path`` (a file or folder); see the module docstring.

    The returned tensors own their memory: nothing refers to the file once this returns.
    """
    path = Path(path)
    config = None
    try:
        is_dir = path.is_dir()
    except PermissionError:  # a parent folder without search permission
        is_dir = False
    if is_dir:
        folder, file = path, find_weights_file(path)
    else:
        folder, file = path.parent, path
    _check_readable(file)
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
    fmt = sniff_format(file)
    raw = _read_safetensors(file) if fmt == "safetensors" else _read_torch(file, fmt)
    state_dict, extra = unwrap(raw, file, ema)
    return Checkpoint(state_dict, file, fmt, config, extra)


def _unreadable(path: Any) -> CheckpointNotReadableError:
    return CheckpointNotReadableError(
        f"permission denied reading {path}: make it readable by this user (e.g. chmod u+r) or copy it elsewhere"
    )


def sniff_format(file: Path) -> str:
    """``safetensors``, ``torch-zip`` or ``torch-legacy`` from the first bytes of ``file``."""
    try:
        with open(file, "rb") as f:
            head = f.read(16)
    except PermissionError as e:
        raise _unreadable(file) from e
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
    except PermissionError as e:
        raise _unreadable(file) from e
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting deeper than json can parse
        raise CorruptCheckpointError(
            f"{file} is not valid JSON ({type(e).__name__}: {e}); fix or delete it"
        ) from e
    return data if isinstance(data, dict) else None


# safetensors dtype codes (https://github.com/huggingface/safetensors, "format") -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Each tensor's byte range (from the safetensors header) read into a freshly allocated tensor.

    Why not ``safetensors.torch.load_file``: it memory-maps the file, so a loaded model would keep depending on
    it (rewritten in place: the weights change; truncated: SIGBUS). ``safetensors.torch.load(bytes)`` would
    need the whole file in memory next to the tensors. Reading each range with ``readinto`` keeps peak memory
    at about one file size and leaves no reference to the file.
    """

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{file} is a damaged or truncated safetensors file ({why}). Delete it and download it again"
        )

    try:
        with open(file, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise bad(f"header of {n} bytes in a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:
                raise bad(f"header is not JSON: {e}") from e
            if not isinstance(header, dict):
                raise bad("header is not a JSON object")
            base = 8 + n
            out: dict[str, torch.Tensor] = {}
            spans: list[tuple[int, int, str]] = []
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                out[name] = _read_range(f, name, info, base, size, bad)
                start, end = info["data_offsets"]
                spans.append((int(start), int(end), name))
            # As the library checks: two tensors over the same bytes would load as one, silently.
            spans.sort()
            for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
                if start < end:
                    raise bad(f"entries {first!r} and {second!r} overlap")
            return out
    except PermissionError as e:
        raise _unreadable(file) from e
    except OSError as e:
        raise bad(f"{type(e).__name__}: {e}") from e


def _read_range(f: Any, name: str, info: Any, base: int, size: int, bad: Any) -> torch.Tensor:
    try:
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"entry {name!r} has no valid dtype/shape/data_offsets ({e})") from e
    if any(d < 0 for d in shape):
        raise bad(f"entry {name!r} has a negative dimension {shape}")
    nbytes = math.prod(shape) * dtype.itemsize  # checked before allocating: a header can claim petabytes
    if not 0 <= start <= end or end - start != nbytes:
        raise bad(f"entry {name!r}: {shape} {info['dtype']} needs {nbytes} bytes, offsets say {end - start}")
    if base + end > size:
        raise bad(f"entry {name!r} ends at byte {base + end} of a {size}-byte file")
    tensor = torch.empty(shape, dtype=dtype, device="cpu")  # explicit: callers may hold a device context
    if nbytes:
        f.seek(base + start)
        view = memoryview(_bytes_of(tensor))
        got = 0
        while got < nbytes:  # raw reads may return short
            k = f.readinto(view[got:])
            if not k:
                raise bad(f"entry {name!r} cut short at byte {base + start + got}")
            got += k
    return tensor


def _bytes_of(tensor: torch.Tensor) -> Any:
    """A writable buffer over a contiguous CPU tensor's bytes (ctypes: no numpy needed, any dtype)."""
    import ctypes

    return (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())


def _read_torch(file: Path, fmt: str) -> Any:
    import argparse

    # The original repository stores its argparse.Namespace under "args": allow that one plain class, nothing
    # else; weights_only=True refuses every other global, so no code from the file ever runs. mmap=False: the
    # tensors are read into memory the model owns (a memory map would tie the model to the file).
    try:
        if fmt == "torch-zip":
            _refuse_torchscript(file)
        # The CRC check reads the file beside torch.load, in a thread (zlib releases the GIL): no added wait.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            damaged = pool.submit(_damaged_member, file) if fmt == "torch-zip" else None
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
            bad = damaged.result() if damaged else None
        if bad is not None:
            raise _corrupt(file, zipfile.BadZipFile(f"member {bad} fails its CRC-32 check"))
        return raw
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            if not _pickle_complete(file, fmt):  # a stream cut inside a name looks like an unknown global
                raise _corrupt(file, EOFError("the pickle stream ends before its STOP opcode")) from e
            raise UnsafeCheckpointError(
                f"{file} contains pickled objects that would run code or build arbitrary classes when loaded, "
                f"so it was refused and nothing in it was executed. Use a .safetensors copy; if you trust the "
                f"file, load it yourself with torch.load(weights_only=False) and pass model.state_dict() data "
                f"through load_checkpoint(model, state_dict)"
            ) from e
        raise _corrupt(file, e) from e
    except PermissionError as e:
        raise _unreadable(file) from e
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        struct.error,
    ) as e:
        raise _corrupt(file, e) from e


def _refuse_torchscript(file: Path) -> None:
    """A ``torch.jit.save`` archive (``constants.pkl``, ``code/``) holds a program: say so, where
    ``weights_only`` would only refuse it as unsafe globals."""
    with zipfile.ZipFile(file) as z:
        if any(n.endswith("/constants.pkl") for n in z.namelist()):
            raise CorruptCheckpointError(
                f"{file} is a TorchScript archive (torch.jit.save), which holds a program, not a state dict. "
                f"If you trust it, load it with torch.jit.load and save its state_dict() with torch.save"
            )


def _damaged_member(file: Path) -> str | None:
    """The first member of a zip torch file whose CRC-32 fails, else None: ``torch.load`` never checks them,
    so a flipped bit in a tensor would load silently (``testzip`` reads every member once)."""
    with zipfile.ZipFile(file) as z:
        return z.testzip()


def _pickle_complete(file: Path, fmt: str) -> bool:
    """Whether the file's pickle stream(s) parse to the end (``pickletools.genops`` decodes opcodes only; it
    never imports or calls anything). Legacy files start with four pickles in a row (magic number, protocol,
    system info, the object); zip files hold one ``data.pkl``."""
    import io
    import pickletools

    try:
        if fmt == "torch-zip":
            with zipfile.ZipFile(file) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                streams = [io.BytesIO(z.read(names[0]))] if names else []
            count = 1
        else:
            streams, count = [open(file, "rb")], 4  # magic, protocol, sys info, the object
        for stream in streams:
            with stream:
                end = stream.seek(0, io.SEEK_END)
                stream.seek(0)
                for _ in range(count):
                    if stream.tell() == end:  # ended cleanly after a STOP (e.g. a single plain pickle)
                        break
                    for _op in pickletools.genops(stream):
                        pass
        return bool(streams)
    except Exception:  # any decoding failure means the stream is damaged, not unsafe
        return False


def _corrupt(file: Path, e: Exception) -> CorruptCheckpointError:
    first = (str(e).splitlines() or [""])[0][:200]
    return CorruptCheckpointError(
        f"{file} is a damaged or truncated torch checkpoint ({type(e).__name__}: {first}). "
        f"Delete it and download it again"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_tensors(obj: Any) -> bool:
    """A wrapped or EMA state dict: tensors, maybe beside metadata (a step count, a version), dropped below."""
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(raw: Any, file: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat state dict inside ``raw`` (``model``/``state_dict`` wrappers removed; with ``ema`` the first of
    :data:`EMA_KEYS` present)."""
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(
            f"{file} holds a {type(raw).__name__}, not a state dict; save model.state_dict() instead of the model"
        )
    extra: list[str] = []
    if ema:
        key = next((k for k in EMA_KEYS if _holds_tensors(raw.get(k))), None)
        if key is None:
            raise CorruptCheckpointError(
                f"{file} has no EMA weights (looked for {', '.join(EMA_KEYS)}; top-level keys: "
                f"{', '.join(sorted(map(str, raw))[:20]) or 'none'}); drop ema=True / --ema to load its weights"
            )
        extra = [k for k in raw if k != key]
        raw = raw[key]
    elif not _is_state_dict(raw):
        for key in WRAPPER_KEYS:
            if _holds_tensors(raw.get(key)):
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
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, then torch.compile
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict, extra
