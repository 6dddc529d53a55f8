"""The one loading path behind every source and format: resolve -> read -> convert -> adapt -> validate -> load.

::

    import deit_registry as dr
    model = dr.create_model("deit_small_patch16_224", pretrained=True)              # official weights
    model = dr.create_model("deit_small_patch16_224", pretrained=True, weights="hf-hub:facebook/deit-small-patch16-224")
    model = dr.create_model("deit_tiny_patch16_224", pretrained=True, num_classes=10, img_size=(256, 320))

    from deit_registry.weights import load_checkpoint
    load_checkpoint(model, "finetuned.safetensors")                                   # in place

Order of work: the options are checked first (the model is built on the meta device, so an unknown keyword or a
bad value fails before any byte is downloaded); then the file is read into tensors the model owns (no memory
map: the file can be rewritten or deleted afterwards); then everything is validated - config values, dtypes,
layouts, devices, non-finite values, keys, shapes - before the first parameter changes, so a failure leaves
an existing model exactly as it was. A new model's parameters are assigned the read tensors (never allocated
twice).

LayerNorm eps: transformers' DeiT/ViT configs say ``layer_norm_eps=1e-12`` where the official models use 1e-6
(logits differ by about 1e-4). A checkpoint whose ``config.json`` names an eps is loaded with that eps (unless
``norm_eps=`` is given explicitly), so outputs equal those of the model it was saved from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architecture import DeiT
from ..errors import CheckpointMismatchError
from ..variants import Variant, get_variant
from . import conversion, formats, sources

Source = str | os.PathLike[str] | Mapping[str, torch.Tensor] | None


def _read(
    source: Source, variant: Variant | None, progress: bool, ema: bool
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """(official-layout state dict, a name for the file in messages, its config.json or None), checked by
    :func:`conversion.check_tensors` before any conversion."""
    if isinstance(source, Mapping):
        state_dict, file, config = dict(source), "the given state dict", None
    else:
        path = sources.resolve(variant, source, progress=progress)
        ckpt = formats.read_checkpoint(path, ema=ema)
        state_dict, file, config = ckpt.state_dict, str(ckpt.file), ckpt.config
    conversion.check_tensors(state_dict, file)
    return conversion.to_official(state_dict), file, config


def _config_eps(config: dict[str, Any] | None, file: str) -> float | None:
    return conversion.config_norm_eps(config, Path(file).parent / "config.json" if config else file)


def _skeleton(opts: dict[str, Any]) -> DeiT:
    """The model on the meta device: checks every option (TypeError / ValueError) without allocating."""
    with torch.device("meta"):
        return DeiT(**opts)


def load_pretrained(
    variant: Variant | str,
    options: dict[str, Any] | None = None,
    source: Source = None,
    *,
    progress: bool = True,
    ema: bool = False,
    convert_distillation: bool = False,
) -> DeiT:
    """Build ``variant`` with ``options`` (the DeiT keyword arguments) and load weights from ``source``.

    Args:
        variant: a :class:`~deit_registry.variants.Variant` or its name.
        options: :class:`~deit_registry.architecture.DeiT` keyword arguments (``num_classes``, ``img_size``,
            ``in_chans``, ``head``, ...); the variant's architecture fills in the rest. They are checked before
            the source is resolved, so a typo never starts a download.
        source: ``None`` (official weights), a local file/folder, an http(s) URL, ``hf-hub:owner/repo[@rev]``
            or a state dict.
        progress: show a download progress bar.
        ema: load a training checkpoint's EMA weights (``model_ema``, or timm's ``state_dict_ema``).
        convert_distillation: allow distilled weights into a plain model (class head kept, distillation token
            dropped) or plain weights into a distilled one (distillation token and head copied from the class
            token and head).
    """
    variant = get_variant(variant)
    opts: dict[str, Any] = variant.model_kwargs()
    opts.update(options or {})
    skeleton = _skeleton(opts)  # before any byte moves
    state_dict, file, config = _read(source, variant, progress, ema)
    if source is None and config is None:  # the published file is at the variant's size, whatever its grid
        config = {"image_size": variant.arch.img_size, "patch_size": variant.arch.patch_size}
    # What the options leave out, the checkpoint decides: the eps it was saved with, and a fine-tune's
    # classifier (not a random 1000-class one).
    given, derived = options or {}, {}
    eps = _config_eps(config, file)
    if eps is not None and "norm_eps" not in given:
        derived["norm_eps"] = eps
    classes = _checkpoint_classes(state_dict)
    if classes is not None and "num_classes" not in given and "head" not in given:
        derived["num_classes"] = classes
    if any(opts.get(k) != v for k, v in derived.items()):
        opts.update(derived)
        skeleton = _skeleton(opts)
    state_dict, fresh = _adapt_and_validate(
        state_dict, skeleton, file, config, convert_distillation, variant.name
    )
    state_dict = _cast(state_dict, skeleton.state_dict(), file, "cpu")
    if fresh or _has_real_tensors(skeleton):
        # Dropped heads (or a user-supplied head module) need real, initialised parameters: build normally.
        model = DeiT(**opts)
        model.load_state_dict(state_dict, strict=False)
    else:
        skeleton.load_state_dict(_own_memory(state_dict, source), strict=True, assign=True)
        model = skeleton
    return model


def _checkpoint_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def _adapt_and_validate(
    state_dict: dict[str, torch.Tensor],
    model: DeiT,
    file: str,
    config: Any,
    convert_distillation: bool,
    name: str | None = None,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Fit ``state_dict`` to ``model`` (heads, position embedding, channels, tokens) and check all of it before
    anything is copied, so a failure leaves the model untouched. Returns it with the keys left fresh."""
    conversion.check_config_architecture(
        config, model.blocks[0].attn.num_heads, Path(file).parent / "config.json"
    )
    expected = model.state_dict()
    state_dict, fresh = conversion.adapt(
        state_dict,
        expected,
        grid_size=model.patch_embed.grid_size,
        file=file,
        config=config,
        convert_distillation=convert_distillation,
    )
    conversion.validate(state_dict, expected, fresh, file, name)
    return state_dict, fresh


def _cast(
    state_dict: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    file: str,
    device: str | None = None,
) -> dict[str, torch.Tensor]:
    """Each tensor in the model's dtype, on ``device`` (else the model's); copies only where they differ, so
    tensors read from a file stay the ones this process owns. Values finite in the file that overflow the
    model's dtype (fp32 weights beyond float16's range) are refused, not loaded as infinities."""
    out = {
        k: v.to(device=device or expected[k].device, dtype=expected[k].dtype) for k, v in state_dict.items()
    }
    # Only a cast to a narrower range can overflow: fp16 or bf16 checkpoints into fp32 models pay nothing.
    narrowed = [k for k, v in out.items() if torch.finfo(v.dtype).max < torch.finfo(state_dict[k].dtype).max]
    overflow = [k for k in narrowed if not conversion.all_finite(out[k])]
    if overflow:
        raise CheckpointMismatchError(
            f"{file}: {', '.join(overflow[:3])} hold values beyond the range of the model's "
            f"{out[overflow[0]].dtype}; load into a float32 (or bfloat16) model, then cast it"
        )
    return out


def _own_memory(state_dict: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    """``state_dict`` with every tensor in memory of its own, for a new model to take as its parameters:
    a tensor of the caller's state dict (often another model's parameters), one sharing memory with an
    earlier key (tied in the checkpoint) or a non-contiguous one (an expanded tensor saved as it was has
    elements sharing memory, which every in-place update refuses) is copied, as ``load_state_dict`` without
    ``assign`` would."""
    taken = set()
    if isinstance(source, Mapping):
        taken = {t.untyped_storage().data_ptr() for t in source.values() if isinstance(t, torch.Tensor)}
    out = {}
    for key, t in state_dict.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = (
            t.clone(memory_format=torch.contiguous_format) if ptr in taken or not t.is_contiguous() else t
        )
        taken.add(ptr)
    return out


def _has_real_tensors(model: nn.Module) -> bool:
    return any(not t.is_meta for t in model.state_dict().values())


def load_checkpoint(
    model: DeiT,
    source: Source,
    *,
    progress: bool = True,
    ema: bool = False,
    convert_distillation: bool = False,
) -> DeiT:
    """Load ``source`` (any form :func:`load_pretrained` takes, except ``None``) into ``model`` in place.

    Heads that do not fit are dropped with a warning and the model's own are kept; a transformers checkpoint
    sets the model's LayerNorm eps to the one it was saved with. Raises a
    :class:`~deit_registry.errors.WeightsError` - before changing anything - if the weights do not fit.
    """
    if source is None:
        raise ValueError(
            "load_checkpoint needs a source: a file, folder, URL, 'hf-hub:owner/repo' or state dict"
        )
    if not isinstance(model, DeiT) and isinstance(getattr(model, "module", None), DeiT):
        model = model.module  # DistributedDataParallel, DataParallel: their documented wrapped module
    if not isinstance(model, DeiT):
        raise CheckpointMismatchError(
            f"load_checkpoint loads into a deit_registry DeiT, not a {type(model).__name__}: load into the model "
            f"before torch.compile or optimize_for_inference (and run those again), or pass the DeiT it wraps"
        )
    if any(t.is_meta for t in model.state_dict().values()):
        raise CheckpointMismatchError(
            "load_checkpoint copies into an existing model, but this one is on the meta device; use "
            "create_model(..., pretrained=True, weights=...) to build a model from a checkpoint"
        )
    state_dict, file, config = _read(source, None, progress, ema)
    eps = _config_eps(config, file)  # a bad config value fails here, before anything changes
    state_dict, fresh = _adapt_and_validate(state_dict, model, file, config, convert_distillation)
    # Cast first: every conversion that could fail happens before the first parameter changes.
    state_dict = _cast(state_dict, model.state_dict(), file)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)
    if eps is not None:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
        model.norm_eps = eps
    return model


def download(
    name: str | Variant, source: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Fetch the weights of ``name`` (or of ``source``) into the local cache and return the cached path.

    ``deit_registry.weights.download("deit_base_patch16_224")`` pre-fetches the variant's weights in the default
    order (the Hub's copy, else the official file), e.g. before going offline (``HF_HUB_OFFLINE=1``).
    """
    return sources.resolve(name, source, progress=progress)
