"""deit-registry: the eight DeiT vision transformers for timm, torch.hub and the model-registry ecosystem.

::

    import deit_registry as dr
    dr.list_models()                                        # the eight names (and any other published model)
    model = dr.create_model("deit_small_distilled_patch16_224", pretrained=True)

``import deit_registry`` is light: torch and the model code are imported on first use of a name that needs
them (PEP 562 lazy attributes), and timm is never imported here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import timm_hook as _timm_hook
from .errors import DeiTRegistryError, ModelImportError, UnknownModelError
from .registry import (
    create_model,
    get_pretrained_cfg,
    is_model,
    list_models,
    load_entry_points,
    model_entrypoint,
    register_model,
)
from .variants import VARIANTS, Architecture, PretrainedWeights, Variant, get_variant

__version__ = "0.1.0"

# timm.create_model("deit_*") builds our models: registers now if timm is imported, else when it is
# (deit_registry.register_with_timm() by hand only where a warning says so).
_timm_hook.install()

# name -> submodule that defines it; imported on first access.
_LAZY = {
    "DeiT": "architecture",
    "resample_pos_embed": "architecture",
    "register_head": "heads",
    "list_heads": "heads",
    "HeadModules": "heads",
    "HeadSpec": "heads",
    "MaskedImageModelingHead": "heads",
    "optimize_for_inference": "fast",
    "register_entry_points": "timm_adapter",
    "register_with_timm": "timm_adapter",
    "FeaturePyramid": "pyramid",
    "register_smp_encoders": "smp_encoder",
    "eval_transform": "transforms",
    "attention_maps": "inspection",
    "class_token_heatmaps": "inspection",
    "DistillationLoss": "training",
    "param_groups_layer_decay": "training",
    "freeze": "training",
    "unfreeze": "training",
    "deit_tiny_patch16_224": "deit",
    "deit_small_patch16_224": "deit",
    "deit_base_patch16_224": "deit",
    "deit_base_patch16_384": "deit",
    "deit_tiny_distilled_patch16_224": "deit",
    "deit_small_distilled_patch16_224": "deit",
    "deit_base_distilled_patch16_224": "deit",
    "deit_base_distilled_patch16_384": "deit",
}

__all__ = [
    "VARIANTS",
    "Architecture",
    "DeiTRegistryError",
    "ModelImportError",
    "PretrainedWeights",
    "UnknownModelError",
    "Variant",
    "create_model",
    "get_pretrained_cfg",
    "get_variant",
    "is_model",
    "list_models",
    "load_entry_points",
    "model_entrypoint",
    "register_model",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deit_registry' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from .architecture import DeiT, resample_pos_embed
    from .deit import (
        deit_base_distilled_patch16_224,
        deit_base_distilled_patch16_384,
        deit_base_patch16_224,
        deit_base_patch16_384,
        deit_small_distilled_patch16_224,
        deit_small_patch16_224,
        deit_tiny_distilled_patch16_224,
        deit_tiny_patch16_224,
    )
    from .fast import optimize_for_inference
    from .heads import HeadModules, HeadSpec, MaskedImageModelingHead, list_heads, register_head
    from .inspection import attention_maps, class_token_heatmaps
    from .pyramid import FeaturePyramid
    from .smp_encoder import register_smp_encoders
    from .timm_adapter import register_entry_points, register_with_timm
    from .training import DistillationLoss, freeze, param_groups_layer_decay, unfreeze
    from .transforms import eval_transform
