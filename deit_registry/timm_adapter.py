"""timm's door: our eight DeiT models registered through timm's public ``register_model`` and ``default_cfgs``.

Importing this module imports timm and registers (``import deit_registry`` arranges that it is imported as soon
as timm is; see :mod:`deit_registry.timm_hook`). ``timm.create_model`` then builds
:class:`deit_registry.DeiT` through :func:`deit_registry.deit.build_deit`, with this package's metadata as its
``pretrained_cfg``::

    import deit_registry, timm
    model = timm.create_model("deit_small_patch16_224.fb_in1k", pretrained=True, num_classes=10)
    model.pretrained_cfg["crop_pct"]                     # 0.875, the official evaluation crop
    backbone = timm.create_model("deit_tiny_patch16_224", features_only=True, out_indices=(3, 7, 11))
    backbone.feature_info.channels(), backbone.feature_info.reduction()   # [192, 192, 192], [16, 16, 16]

Pretrained weights go through :func:`deit_registry.weights.load_pretrained`: our own cfg lets it pick its
default source; timm's ``pretrained_cfg_overlay=dict(file=...)``, ``url=``, ``hf_hub_id=`` or ``state_dict=``
is passed to it unchanged.

:func:`register_entry_points` publishes every model of the entry-point group ``timm.models`` (of any
distribution) into timm, through the same public ``register_model``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm.layers
from timm.models import (
    PretrainedCfg,
    build_model_with_cfg,
    generate_default_cfgs,
    is_model,
    model_entrypoint,
    register_model,
    register_notrace_module,
    resolve_pretrained_cfg,
)
from torch import nn

from .architecture import Attention, PatchEmbed
from .deit import CONSTRUCTORS, build_deit
from .errors import TimmRegistrationError
from .registry import load_entry_points
from .variants import PRETRAINED_TAG, VARIANTS, Variant, get_variant
from .weights.netlimits import cache_dir_scope


def timm_pretrained_cfg(variant: Variant | str) -> PretrainedCfg:
    """The ``timm.models.PretrainedCfg`` of a variant (:meth:`~deit_registry.variants.Variant.pretrained_cfg`)."""
    return PretrainedCfg(**get_variant(variant).pretrained_cfg())


# Read by timm's register_model for the entries below (name -> DefaultCfg, tag fb_in1k).
default_cfgs = generate_default_cfgs({f"{n}.{PRETRAINED_TAG}": timm_pretrained_cfg(n) for n in VARIANTS})


# ------------------------------------------------------------------------------------------ construction
def _weights_source(variant: Variant, cfg: PretrainedCfg) -> Any:
    """What a timm pretrained cfg asks :func:`~deit_registry.weights.load_pretrained` for: None for our own cfg
    (the weights layer picks its default order), else the file, state dict, hub id or URL it names."""
    if cfg.file:
        return Path(cfg.file)
    if cfg.state_dict is not None:
        return cfg.state_dict
    if cfg.hf_hub_id and cfg.hf_hub_id != variant.weights.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}"
    url = cfg.url[0] if isinstance(cfg.url, (tuple, list)) else cfg.url
    if url and url != variant.weights.url:
        return url
    if not (cfg.url or cfg.hf_hub_id):
        raise ValueError(
            f"{variant.name}: the pretrained cfg names no weights (url, file, hf_hub_id and state_dict are all "
            "empty); set one in pretrained_cfg_overlay or pass pretrained=False"
        )
    return None


def honour_fused_attn(model: nn.Module) -> nn.Module:
    """Set every attention layer's ``fused_attn`` from ``timm.layers.use_fused_attn()``, as timm's own models
    do when built (so ``timm.layers.set_fused_attn(False)`` applies to ours)."""
    fused = timm.layers.use_fused_attn()
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused
    return model


def build_timm_model(
    name: str,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: Any = None,
    out_indices: Any = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` through timm's ``build_model_with_cfg`` around :func:`~deit_registry.deit.build_deit`.

    Takes timm's factory keywords (``pretrained_cfg``, ``pretrained_cfg_overlay`` incl. ``file=``,
    ``cache_dir``, ``features_only``, ``out_indices``, ``feature_cls``, ``device``, ``dtype``) and every option
    of the builder. The model carries ``pretrained_cfg``; with ``features_only=True`` it is timm's
    ``FeatureGetterNet`` giving NCHW stride-16 maps of the blocks ``out_indices`` (an int n: the last n).
    """
    variant = get_variant(name)
    if weights is not None and not pretrained:
        raise ValueError("weights= names a checkpoint to load; pass pretrained=True as well")
    source = weights
    if pretrained and weights is None:
        cfg = resolve_pretrained_cfg(
            variant.name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay
        )
        source = _weights_source(variant, cfg)

    def construct(**options: Any) -> nn.Module:
        if pretrained:
            options["weights"] = source
        # timm's cache_dir= for this call only: URL files in cache_dir/checkpoints, Hub files in cache_dir
        with cache_dir_scope(cache_dir if pretrained else None):
            return honour_fused_attn(build_deit(variant, pretrained, **options))

    return build_model_with_cfg(
        construct,
        variant.name,
        pretrained=False,  # weights are loaded by the builder, before any features_only wrapping
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        cache_dir=cache_dir,
        **kwargs,
    )


def _timm_entry(name: str) -> Callable[..., nn.Module]:
    """The function timm's registry holds for ``name`` (registered under its ``__name__``)."""

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_timm_model(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = CONSTRUCTORS[name].__doc__
    return entry


ENTRIES: dict[str, Callable[..., nn.Module]] = {name: _timm_entry(name) for name in VARIANTS}
globals().update(ENTRIES)  # deit_registry.timm_adapter.<name>, where timm's registry says they live

# timm warns "Overwriting <name> in registry with <module>.<name>" when replacing its own deit_* entries:
# expected for these eight names, from this module, and silenced at that call only.
_OVERWRITE_WARNING = (
    rf"Overwriting ({'|'.join(map(re.escape, VARIANTS))}) in registry with {re.escape(__name__)}\."
)


def _not_ours() -> list[str]:
    """The eight names for which timm's public lookup gives other code than ours."""
    return [n for n, fn in ENTRIES.items() if model_entrypoint(n) is not fn]


def is_registered() -> bool:
    """Whether ``timm.create_model`` builds our model under each of the eight names."""
    return not _not_ours()


def register_with_timm() -> list[str]:
    """Make ``timm.create_model`` build our eight models (idempotent; timm's ``deit3_*`` are left alone).

    Runs by itself once ``deit_registry`` and timm are both imported; call it by hand only when a warning says
    so. Returns the names registered; raises :class:`~deit_registry.errors.TimmRegistrationError` if timm's
    lookup still gives other code for one of them afterwards.
    """
    if _not_ours():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_OVERWRITE_WARNING, category=UserWarning)
            for fn in ENTRIES.values():
                register_model(fn)
        # Trust but verify: a registration that did not take would leave timm's own DeiT in place, and every
        # script would run with it without a word.
        stale = _not_ours()
        if stale:
            raise TimmRegistrationError(
                f"timm.create_model still resolves {', '.join(stale)} to other code after registering ours; "
                "report this with your timm version (import timm; timm.__version__)"
            )
    # timm's fx feature extraction keeps the patch embedding whole, as it does for its own PatchEmbed
    register_notrace_module(PatchEmbed)  # in timm.models since timm 1.0, also in timm.layers later
    return list(ENTRIES)


def register_entry_points(replace: bool = False) -> list[str]:
    """Register every model published in the entry-point group ``timm.models`` with timm.

    Any distribution can publish a model the way this package publishes its eight (``pyproject.toml``)::

        [project.entry-points."timm.models"]
        my_net = "my_package.models:my_net"      # a function (pretrained=False, **kwargs) -> nn.Module

    then ``deit_registry.register_entry_points()`` makes ``timm.create_model("my_net")`` work. Registration
    goes through timm's public ``register_model``, so a pretrained cfg comes only from the publishing module's
    own timm-style ``default_cfgs`` (as for timm's models); a ``pretrained_cfg`` attribute on the function is
    not read. A name timm already has is kept as timm's (with a warning) unless ``replace=True``; our eight
    names stay ours. A broken publisher only warns. Returns the names registered (ours included).
    """
    installed = register_with_timm()
    for name, fn in sorted(load_entry_points().items()):
        if name in ENTRIES:
            continue
        if is_model(name) and model_entrypoint(name) is not fn and not replace:
            warnings.warn(
                f"entry point {name!r} ({getattr(fn, '__module__', '?')}) is not registered with timm: timm "
                "already has a model of that name. Pass replace=True to use the published one",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        with warnings.catch_warnings():
            if replace:
                warnings.filterwarnings("ignore", message=rf"Overwriting {re.escape(name)} in registry")
            register_model(fn)
        installed.append(name)
    return installed


__all__ = [
    "ENTRIES",
    "build_timm_model",
    "default_cfgs",
    "honour_fused_attn",
    "is_registered",
    "register_entry_points",
    "register_with_timm",
    "timm_pretrained_cfg",
]

register_with_timm()
