"""Save a DeiT as ``model.safetensors`` + ``config.json`` in timm's hub layout, and convert any checkpoint to it.

What we save loads back with :func:`deit_registry.weights.load_pretrained` (``weights=DIR``), with
``timm.create_model("local-dir:DIR")`` and, once uploaded, with ``timm.create_model("hf-hub:owner/repo")``::

    from deit_registry.weights import convert, save_pretrained
    save_pretrained(model, "out/deit_small")                                  # model.safetensors, config.json
    convert("deit_small_patch16_224-cd65a155.pth", "out/deit_small")           # any supported checkpoint
    # or from a shell:  python -m deit_registry.weights convert SRC DST [--name deit_small_patch16_224]

timm's DeiT has no LayerNorm-eps argument, so a model built with another eps (weights converted from
transformers, 1e-12) records it as a top-level ``layer_norm_eps`` that deit_registry honours and timm ignores.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..architecture import DeiT
from ..errors import CheckpointMismatchError, WeightsError
from ..variants import VARIANTS, Variant, get_variant
from . import conversion, formats, sources

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _variant_of(model: DeiT) -> Variant:
    """The variant with ``model``'s architecture (:func:`conversion.guess_variant`, the one guesser)."""
    with torch.no_grad():
        name = conversion.guess_variant(model.state_dict(), num_heads=model.blocks[0].attn.num_heads)
    if name is None:
        raise ValueError(
            f"this model (embed_dim {model.embed_dim}, depth {len(model.blocks)}) is none of the eight DeiT "
            f"variants; pass name= to save_pretrained to name its architecture"
        )
    return VARIANTS[name]


def timm_config(model: DeiT, variant: Variant) -> dict[str, Any]:
    """``config.json`` in the layout of timm's hub repositories (``architecture``, ``pretrained_cfg``...)."""
    w = variant.weights
    size = tuple(model.patch_embed.img_size)
    model_args: dict[str, Any] = {}
    if size != (variant.arch.img_size, variant.arch.img_size):
        model_args["img_size"] = list(size)
    if model.in_chans != 3:
        model_args["in_chans"] = model.in_chans
    if model.global_pool != "token":
        model_args["global_pool"] = model.global_pool
        # timm normalises after pooling by default where pooling is not the class token; ours pools the
        # normalised tokens, which timm's fc_norm=False spells (its distilled class has only the token pool).
        model_args["fc_norm"] = False
    classifier: Any = ["head", "head_dist"] if model.head_dist is not None else "head"
    config: dict[str, Any] = {
        "architecture": variant.name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "pretrained_cfg": {
            "tag": w.tag,
            "custom_load": False,
            "input_size": [model.in_chans, *size],
            "fixed_input_size": True,
            "interpolation": w.interpolation,
            "crop_pct": w.crop_pct,
            "crop_mode": w.crop_mode,
            "mean": list(w.mean),
            "std": list(w.std),
            "num_classes": model.num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": classifier,
            "license": w.license,
        },
    }
    if model_args:
        config["model_args"] = model_args
    if abs(model.norm_eps - 1e-6) > 1e-15:
        config["layer_norm_eps"] = model.norm_eps
    return config


def save_pretrained(model: DeiT, directory: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (timm's layout) into ``directory``; return it.

    ``name`` is the architecture recorded in the config (default: the variant with the model's shape).
    """
    variant = get_variant(name) if name else _variant_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    config = timm_config(model, variant)
    if variant.arch.distilled and (model.global_pool != "token" or model.head_kind == "classifier"):
        warnings.warn(
            f"{directory}: timm's distilled DeiT has a class and a distillation head and pools the tokens, so "
            f"timm cannot build this model (global_pool={model.global_pool!r}, head={model.head_kind!r}); "
            f"deit_registry reads it with the same options (weights={str(directory)!r})",
            stacklevel=2,
        )
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def check_destination(dst: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse ``dst`` before any work: not a folder, not writable, or already holding a converted checkpoint
    (``model.safetensors`` / ``config.json``) unless ``overwrite``. Raises :class:`WeightsError`."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"destination {dst} is a file, not a folder; choose a folder path")
    existing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if (dst / n).exists()]
    if existing and not overwrite:
        raise WeightsError(
            f"destination {dst} already holds {' and '.join(existing)}; choose an empty folder, or pass "
            f"--force (overwrite=True) to replace them"
        )
    probe = dst
    while not probe.exists():  # the nearest existing ancestor is where the folder would be created
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WeightsError(
            f"cannot write to {probe} (permission denied or read-only); choose a writable destination folder"
        )
    return dst


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    name: str | None = None,
    *,
    ema: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert any supported checkpoint (official ``.pth``, training checkpoint, timm or transformers files,
    URL, ``hf-hub:`` id) into ``dst`` as ``model.safetensors`` + ``config.json``.

    The variant is read from the weights' shapes unless ``name`` says; ``num_classes`` and the image size
    are kept as saved. ``ema`` takes the EMA weights of a training checkpoint (the original repository's
    ``model_ema`` or timm's ``state_dict_ema``). An existing ``model.safetensors`` or ``config.json`` in
    ``dst`` is refused unless ``overwrite``; the destination is checked before anything is read.
    """
    from .loading import load_pretrained

    check_destination(dst, overwrite)
    path = sources.resolve(name, src)
    ckpt = formats.read_checkpoint(path, ema=ema)
    sd = conversion.to_official(ckpt.state_dict)
    if conversion.one_head_beside_dist_token(sd):
        raise CheckpointMismatchError(
            f"{path} has one classifier beside its distillation token (as transformers' "
            f"DeiTForImageClassification); timm's distilled DeiT has two heads, so timm's layout cannot hold it. "
            f"Load it with create_model(name, pretrained=True, weights=..., head='classifier') instead"
        )
    if name is None:
        heads = (ckpt.config or {}).get("num_attention_heads")
        name = conversion.guess_variant(sd, num_heads=heads if isinstance(heads, int) else None)
        if name is None:
            raise CheckpointMismatchError(
                f"cannot tell which DeiT variant {path} holds (no cls_token of a DeiT width); pass name= "
                f"(--name), e.g. 'deit_small_patch16_224'"
            )
    variant = get_variant(name)
    options: dict[str, Any] = {}
    if "head.weight" not in sd:  # a backbone: no classifier (else load_pretrained takes the checkpoint's)
        options["num_classes"] = 0
    pos = sd.get("pos_embed")
    prefix = 2 if "dist_token" in sd else 1
    if pos is not None and pos.shape[1] - prefix != (variant.arch.img_size // variant.arch.patch_size) ** 2:
        grid = conversion.config_grid(ckpt.config, pos.shape[1] - prefix) or conversion.square_grid(
            pos.shape[1] - prefix
        )
        if grid is not None:
            options["img_size"] = (grid[0] * variant.arch.patch_size, grid[1] * variant.arch.patch_size)
    proj = sd.get("patch_embed.proj.weight")
    if proj is not None and proj.shape[1] != 3:
        options["in_chans"] = int(proj.shape[1])
    model = load_pretrained(variant, options, source=path, ema=ema, progress=False)
    try:
        return save_pretrained(model, dst, variant.name)
    except PermissionError as e:
        raise WeightsError(
            f"cannot write to {e.filename or dst} (permission denied); choose a writable destination folder"
        ) from e
