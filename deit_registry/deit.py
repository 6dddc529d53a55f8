"""The one builder of the eight DeiT models, and their constructors (torch only).

Every door calls :func:`build_deit`: :func:`deit_registry.create_model`, the entry points of the ``timm.models``
group (``deit_registry.deit:<name>``), ``hubconf.py`` (which imports the eight constructors below) and the timm
door (:mod:`deit_registry.timm_adapter`, a thin layer on timm's ``build_model_with_cfg``)::

    from deit_registry.deit import build_deit, deit_small_distilled_patch16_224
    model = deit_small_distilled_patch16_224(num_classes=10, drop_path_rate=0.1)
    model = build_deit("deit_tiny_patch16_224.fb_in1k", pretrained=True, weights="my_finetune.safetensors")

Options (every constructor):

* the :class:`~deit_registry.architecture.DeiT` arguments: ``num_classes``, ``head``, ``img_size``,
  ``in_chans``, ``global_pool``, ``drop_rate``, ``drop_path_rate``, ``dynamic_img_size``, ``norm_eps``, ...;
* ``device`` and ``dtype``: where and in which precision the model is built;
* with ``pretrained=True``: ``weights=`` (another checkpoint: a file or folder, a URL, ``hf-hub:owner/repo``),
  ``ema=``, ``convert_distillation=``, ``progress=`` (see :func:`deit_registry.weights.load_pretrained`);
* the keywords of timm's ``VisionTransformer`` where their value keeps the model a DeiT (``act_layer="gelu"``,
  ``norm_layer=nn.LayerNorm``, ``weight_init=""``, ``class_token=True``, ``reg_tokens=0``, ...); any other value
  raises ``ValueError`` naming the keyword and why.

timm's factory options (``features_only``, ``pretrained_cfg``, ``cache_dir``, ...) belong to
``timm.create_model``, which builds these same models once ``deit_registry`` is imported.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
from torch import nn

from .architecture import DeiT
from .variants import Variant, get_variant

# Options of deit_registry.weights.load_pretrained (not DeiT arguments); they need pretrained=True.
LOADER_OPTIONS = ("weights", "progress", "ema", "convert_distillation")

# Options of timm.create_model / build_model_with_cfg, meaningless to a model constructor.
TIMM_FACTORY_OPTIONS = frozenset(
    {
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "cache_dir",
        "checkpoint_path",
        "features_only",
        "out_indices",
        "feature_cls",
        "feature_cfg",
        "pretrained_model_args",
        "scriptable",
        "exportable",
        "no_jit",
    }
)

# Keywords of timm's VisionTransformer that DeiT has no argument for: the values that keep the model a DeiT,
# and why any other value does not.
_FIXED_TIMM_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "qk_norm": ((False,), "DeiT has no query/key normalisation"),
    "scale_attn_norm": ((False,), "DeiT has no normalisation inside attention"),
    "scale_mlp_norm": ((False,), "DeiT has no normalisation inside the MLP"),
    "proj_bias": ((True,), "DeiT's attention and MLP projections have biases"),
    "init_values": ((None,), "layer scale belongs to DeiT III (timm's deit3_* models)"),
    "class_token": ((True,), "DeiT reads its class token"),
    "pos_embed": (("learn",), "DeiT learns its position embedding"),
    "no_embed_class": ((False,), "DeiT's position embedding covers its class (and distillation) token"),
    "reg_tokens": ((0,), "DeiT has no register tokens"),
    "pre_norm": ((False,), "DeiT has no norm before its blocks"),
    "final_norm": ((True,), "DeiT normalises after its blocks"),
    "fc_norm": ((None, False), "this DeiT normalises the tokens before pooling (timm's fc_norm=False)"),
    "pool_include_prefix": ((False,), "average pooling reads the patch tokens only"),
    "patch_drop_rate": ((0,), "patch dropout is not part of DeiT"),
    "weight_init": (("",), "DeiT initialises as timm's default scheme (weight_init='')"),
    "fix_init": ((False,), "DeiT keeps timm's default initialisation (fix_init=False)"),
    "embed_norm_layer": ((None,), "DeiT has no norm in its patch embedding"),
}

# Layer keywords of timm's VisionTransformer: timm's default class is the same computation as ours.
_TIMM_DEFAULT_LAYERS = {
    "embed_layer": ("timm.layers.patch_embed.PatchEmbed",),
    "block_fn": ("timm.models.vision_transformer.Block",),
    "mlp_layer": ("timm.layers.mlp.Mlp",),
    # timm.models.vision_transformer.Attention until timm moved it to timm.layers
    "attn_layer": ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention"),
}
_GELU_CLASSES = ("torch.nn.modules.activation.GELU", "timm.layers.activations.GELU")


def _qualname(value: Any) -> str:
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"


def _norm_eps(value: Any) -> float | None:
    """The eps of a LayerNorm given as timm's ``norm_layer`` (None: keep ours), or ValueError."""
    if value is None or (isinstance(value, str) and value.lower() in ("layernorm", "layer_norm")):
        return None  # timm's DeiT default: LayerNorm with eps 1e-6, as ours
    cls, keywords = value, {}
    if isinstance(value, functools.partial) and not value.args:
        cls, keywords = value.func, dict(value.keywords)
    if isinstance(cls, type) and issubclass(cls, nn.LayerNorm) and set(keywords) <= {"eps"}:
        return float(keywords.get("eps", inspect.signature(cls).parameters["eps"].default))
    raise ValueError(
        f"norm_layer={value!r}: DeiT uses LayerNorm; pass None, 'layernorm', nn.LayerNorm or "
        "functools.partial(nn.LayerNorm, eps=...) (or norm_eps=...)"
    )


def translate_timm_options(options: dict[str, Any]) -> dict[str, Any]:
    """Turn the keywords of timm's ``VisionTransformer`` in ``options`` into DeiT arguments (a new dict).

    A value that keeps the model a DeiT is accepted (and dropped, or mapped: ``norm_layer`` to ``norm_eps``);
    any other raises ``ValueError`` naming the keyword and why.
    """
    out = dict(options)
    for key, (allowed, why) in _FIXED_TIMM_OPTIONS.items():
        if key in out:
            value = out.pop(key)
            if value not in allowed:  # by equality: patch_drop_rate=0.0 and reg_tokens=0 are DeiT
                raise ValueError(f"{key}={value!r} is not supported: {why} (accepted: {allowed})")
    for key, default in _TIMM_DEFAULT_LAYERS.items():
        if key in out:
            value = out.pop(key)
            if (
                value is not None
                and _qualname(value) not in default
                and getattr(value, "__module__", "") != DeiT.__module__
            ):
                raise ValueError(
                    f"{key}={value!r} is not supported: DeiT builds its own layers; only timm's default "
                    f"({' or '.join(default)}) or None is accepted"
                )
    if "act_layer" in out:
        value = out.pop("act_layer")
        if not (value is None or value == "gelu" or _qualname(value) in _GELU_CLASSES):
            raise ValueError(
                f"act_layer={value!r} is not supported: DeiT's MLP uses exact GELU ('gelu', nn.GELU)"
            )
    if "norm_layer" in out:
        eps = _norm_eps(out.pop("norm_layer"))
        if eps is not None:
            if "norm_eps" in out and out["norm_eps"] != eps:
                raise ValueError(
                    f"norm_layer gives eps={eps} but norm_eps={out['norm_eps']}: pass one of them"
                )
            out["norm_eps"] = eps
    return out


@functools.cache
def _deit_arguments() -> frozenset[str]:
    return frozenset(inspect.signature(DeiT).parameters)


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The DeiT arguments of ``options`` (timm keywords translated), checked before anything is built or read."""
    factory = sorted(TIMM_FACTORY_OPTIONS & set(options))
    if factory:
        raise ValueError(
            f"{', '.join(factory)} {'is an option' if len(factory) == 1 else 'are options'} of timm.create_model, "
            f"not of the model constructor: use timm.create_model({name!r}, ...) (with deit_registry imported it "
            "builds this same model)"
        )
    options = translate_timm_options(options)
    unknown = sorted(set(options) - _deit_arguments() - {"device", "dtype"})
    if unknown:
        raise TypeError(
            f"{name}: unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the options are the "
            f"arguments of deit_registry.DeiT ({', '.join(sorted(_deit_arguments()))}), device, dtype and, with "
            f"pretrained=True, {', '.join(LOADER_OPTIONS)}"
        )
    return options


def build_deit(variant: str | Variant, pretrained: bool = False, **kwargs: Any) -> DeiT:
    """Build ``variant`` (a name, ``name.fb_in1k`` or a :class:`~deit_registry.variants.Variant`) with
    ``kwargs`` overriding its defaults; ``pretrained=True`` loads its weights (options: module docstring).

    With ``pretrained=True``, ``weights=None`` lets :func:`deit_registry.weights.load_pretrained` pick the
    variant's default source; ``weights=`` names another (a local file or folder, a URL, ``hf-hub:owner/repo``).
    """
    variant = get_variant(variant)
    load_options = {k: kwargs.pop(k) for k in LOADER_OPTIONS if k in kwargs}
    options = check_options(variant.name, kwargs)
    device, dtype = options.pop("device", None), options.pop("dtype", None)
    given = [k for k, v in load_options.items() if v is not None]
    if not pretrained and given:
        raise ValueError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} pretrained=True as well")
    model_options: dict[str, Any] = variant.model_kwargs()
    model_options.update(options)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if pretrained:
            # weights pull in safetensors/huggingface_hub: imported only when asked for
            from .weights import load_pretrained

            source = load_options.pop("weights", None)
            # the options as given: what they leave out (num_classes, norm_eps) the checkpoint may decide
            model = load_pretrained(variant, options, source=source, **load_options)
            if device is not None:
                model.to(device)
        else:
            model = DeiT(**model_options)
    if dtype is not None:
        model.to(dtype=dtype)
    # As timm's factories do: timm.data.resolve_model_data_config and friends read it (the timm door
    # replaces it with timm's resolved cfg).
    model.pretrained_cfg = model.default_cfg = variant.pretrained_cfg()
    return model


def deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-Ti 224: 5.7M parameters, 1.3 GMACs, 72.2% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_tiny_patch16_224", pretrained, **kwargs)


def deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-S 224: 22.1M parameters, 4.6 GMACs, 79.9% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_small_patch16_224", pretrained, **kwargs)


def deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B 224: 86.6M parameters, 17.6 GMACs, 81.8% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_base_patch16_224", pretrained, **kwargs)


def deit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B 384: 86.9M parameters, 55.5 GMACs, 82.9% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_base_patch16_384", pretrained, **kwargs)


def deit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-Ti distilled 224 (class + distillation token, logits = mean of both heads): 5.9M parameters,
    74.5% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_tiny_distilled_patch16_224", pretrained, **kwargs)


def deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-S distilled 224 (class + distillation token, logits = mean of both heads): 22.4M parameters,
    81.2% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_small_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B distilled 224 (class + distillation token, logits = mean of both heads): 87.3M parameters,
    83.4% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
    return build_deit("deit_base_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_384(pretrained: bool = False, **kwargs: Any) -> DeiT:
    """DeiT-B distilled 384 (class + distillation token, logits = mean of both heads): 87.6M parameters,
    85.2% ImageNet top-1 (official weights with pretrained=True).

    Options: num_classes, img_size, in_chans, global_pool, head, drop_rate, drop_path_rate, dynamic_img_size,
    device, dtype; with pretrained=True weights= (file, URL or hf-hub:owner/repo). See help(deit_registry.deit).
    """
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
