"""The eight DeiT constructors, as published in the ``timm.models`` entry-point group and in hubconf.py.

Each builds :class:`deit_registry.architecture.DeiT` from the variant table::

    from deit_registry.deit import deit_small_distilled_patch16_224
    model = deit_small_distilled_patch16_224(num_classes=10, drop_path_rate=0.1)

Keyword options are those of :class:`~deit_registry.architecture.DeiT` (``num_classes``, ``head``, ``img_size``,
``in_chans``, ``drop_rate``, ``drop_path_rate``, ``global_pool``, ``dynamic_img_size``, ...).
"""

from __future__ import annotations

from typing import Any

from .architecture import DeiT
from .variants import VARIANTS


def build_deit(name: str, pretrained: bool = False, **kwargs: Any) -> DeiT:
    """Build the variant ``name`` with ``kwargs`` overriding its defaults; ``pretrained`` loads its weights.

    With ``pretrained=True`` the keyword ``weights`` may name another source (a local file or folder, a URL,
    ``hf-hub:owner/repo``); see :func:`deit_registry.weights.load_pretrained`.
    """
    from .timm_adapter import TIMM_KEYWORDS  # stdlib-only module; timm itself is imported only if needed

    if not TIMM_KEYWORDS.isdisjoint(kwargs):  # called by timm.create_model, or with its options
        from .timm_adapter import build_timm_model

        return build_timm_model(name, pretrained, **kwargs)
    variant = VARIANTS[name]
    weights_source = kwargs.pop("weights", None)
    # Loader options of deit_registry.weights.load_pretrained (not DeiT arguments).
    load_options = {k: kwargs.pop(k) for k in ("progress", "ema", "convert_distillation") if k in kwargs}
    options: dict[str, Any] = variant.model_kwargs()
    options.update(kwargs)
    if not pretrained:
        if weights_source is not None or load_options:
            raise ValueError(
                "weights=, ema=, convert_distillation= and progress= need pretrained=True as well"
            )
        return DeiT(**options)
    from .weights import load_pretrained  # weights pull in safetensors/huggingface_hub: only when asked

    return load_pretrained(variant, options, source=weights_source, **load_options)


def deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-Ti 224: 5.7M parameters, 1.3 GMACs, 72.2% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_tiny_patch16_224", pretrained, **kwargs)


def deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-S 224: 22.1M parameters, 4.6 GMACs, 79.9% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_small_patch16_224", pretrained, **kwargs)


def deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B 224: 86.6M parameters, 17.6 GMACs, 81.8% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_base_patch16_224", pretrained, **kwargs)


def deit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B 384: 86.9M parameters, 55.5 GMACs, 82.9% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_base_patch16_384", pretrained, **kwargs)


def deit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-Ti distilled 224: 5.9M parameters, 74.5% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_tiny_distilled_patch16_224", pretrained, **kwargs)


def deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-S distilled 224: 22.4M parameters, 81.2% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_small_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B distilled 224: 87.3M parameters, 83.4% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_base_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_384(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B distilled 384: 87.6M parameters, 85.2% ImageNet top-1 (official weights with pretrained=True)."""
    return build_deit("deit_base_distilled_patch16_384", pretrained, **kwargs)


CONSTRUCTORS = {
    fn.__name__: fn
    for fn in (
        deit_tiny_patch16_224,
        deit_small_patch16_224,
        deit_base_patch16_224,
        deit_base_patch16_384,
        deit_tiny_distilled_patch16_224,
        deit_small_distilled_patch16_224,
        deit_base_distilled_patch16_224,
        deit_base_distilled_patch16_384,
    )
}
