"""timm integration: our eight DeiT constructors replace timm's own ``deit_*`` entries in timm's registry.

Registration is automatic (see :mod:`deit_registry.timm_hook`): once both packages are imported, in either order,
``timm.create_model`` builds :class:`deit_registry.DeiT` with this package's metadata as its ``pretrained_cfg``::

    import deit_registry, timm
    model = timm.create_model("deit_small_patch16_224.fb_in1k", pretrained=True, num_classes=10)
    model.pretrained_cfg["crop_pct"]                     # 0.875, the official evaluation crop
    backbone = timm.create_model("deit_tiny_patch16_224", features_only=True, out_indices=(3, 7, 11))
    backbone.feature_info.channels(), backbone.feature_info.reduction()   # [192, 192, 192], [16, 16, 16]

Pretrained weights go through :func:`deit_registry.weights.load_pretrained` (official URL, sha256 check, cache),
so timm's ``pretrained_cfg_overlay=dict(file=...)``, ``url=`` or ``hf_hub_id=`` pick another source.

:func:`register_entry_points` installs every model published in the entry-point group ``timm.models`` (by any
distribution) into timm's registry: the plugin contract timm itself lacks.

timm is imported inside the functions here, never at module level.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UnknownModelError
from .registry import ENTRY_POINT_GROUP, PRETRAINED_TAG, load_entry_points
from .variants import VARIANTS, Variant

TIMM_MODULE = "deit"  # timm groups models by the last component of their module: ours is deit_registry.deit
ORIGIN_URL = "https://github.com/facebookresearch/deit"
# keywords that only mean something through timm's model factory (build_deit routes calls carrying them here)
TIMM_KEYWORDS = frozenset(
    {
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "cache_dir",
        "features_only",
        "out_indices",
        "feature_cls",
        "feature_cfg",
        "device",
        "dtype",
        "pretrained_model_args",
    }
)
_state = {"patched_factory": False}


class UnknownTimmModelError(UnknownModelError, RuntimeError):
    """``timm.create_model`` with an unknown name; a ``RuntimeError`` as timm's own, listing the close names."""

    def __init__(self, name: str, suggestions: list[str], known: int) -> None:
        super().__init__(name, suggestions, known)
        self.args = (str(self).replace("deit_registry.list_models()", "timm.list_models()"),)


def timm_pretrained_cfg(variant: Variant | str) -> Any:
    """The ``timm.models.PretrainedCfg`` of a variant, from :mod:`deit_registry.variants` (the official crop
    0.875, bicubic, the official URL and timm's hub mirror)."""
    from timm.models import PretrainedCfg

    v = VARIANTS[variant] if isinstance(variant, str) else variant
    w = v.weights
    return PretrainedCfg(
        url=w.url,
        hf_hub_id=w.hf_hub_id,
        hf_hub_filename=w.hf_hub_filename,
        architecture=v.name,
        tag=w.tag,
        input_size=w.input_size,
        fixed_input_size=True,
        interpolation=w.interpolation,
        crop_pct=w.crop_pct,
        crop_mode=w.crop_mode,
        mean=w.mean,
        std=w.std,
        num_classes=w.num_classes,
        first_conv="patch_embed.proj",
        classifier=("head", "head_dist") if v.arch.distilled else "head",
        license=w.license,
        description=f"{v.name}: ImageNet-1k top-1 {w.top1}, top-5 {w.top5} (official weights)",
        origin_url=ORIGIN_URL,
        paper_name=v.paper,
        paper_ids="arXiv:2012.12877",
    )


# ---------------------------------------------------------------------------------------------- registry
def _clear_timm_entry(reg: Any, name: str) -> None:
    """Remove every trace of ``name`` from timm's registry (what timm does before it warns "Overwriting")."""
    if hasattr(reg, "_clear_model_entries"):
        reg._clear_model_entries(name)
        return
    module = reg._model_to_module.pop(name, None)  # older timm: the same, by hand
    if module is not None and module in reg._module_to_models:
        reg._module_to_models[module].discard(name)
    for key in reg._model_with_tags.pop(name, []) + [name]:
        reg._model_pretrained_cfgs.pop(key, None)
        reg._model_has_pretrained.discard(key)
    reg._model_default_cfgs.pop(name, None)
    reg._model_entrypoints.pop(name, None)


def _install(reg: Any, name: str, fn: Any, module: str, cfgs: dict[str, Any] | None) -> None:
    """Put ``fn`` (and its pretrained cfgs by tag, default first) into timm's registry dicts."""
    from collections import deque
    from dataclasses import replace

    from timm.models._pretrained import DefaultCfg

    _clear_timm_entry(reg, name)
    reg._model_entrypoints[name] = fn
    reg._model_to_module[name] = module
    reg._module_to_models[module].add(name)
    if not cfgs:
        return
    default = DefaultCfg(tags=deque(cfgs), cfgs={})
    for i, (tag, cfg) in enumerate(cfgs.items()):
        cfg = replace(cfg, architecture=name, tag=tag)
        default.cfgs[tag] = cfg
        if i == 0:
            reg._model_pretrained_cfgs[name] = cfg
        reg._model_pretrained_cfgs[f"{name}.{tag}"] = cfg
        reg._model_with_tags[name].append(f"{name}.{tag}")
        if cfg.has_weights:
            default.is_pretrained = True
            reg._model_has_pretrained.update({name, f"{name}.{tag}"} if i == 0 else {f"{name}.{tag}"})
    reg._model_default_cfgs[name] = default


def register_with_timm() -> list[str]:
    """Replace timm's eight ``deit_*`` entries with ours (idempotent; ``deit3_*`` are left alone).

    Called automatically when both packages are imported; returns the names registered.
    """
    from timm.models import _registry as reg

    from .deit import CONSTRUCTORS

    for name, fn in CONSTRUCTORS.items():
        _install(reg, name, fn, TIMM_MODULE, {PRETRAINED_TAG: timm_pretrained_cfg(name)})
    _register_fx_leaves()
    _patch_unknown_model_error()
    return list(CONSTRUCTORS)


def _register_fx_leaves() -> None:
    """torch.fx feature extraction through timm: the patch embedding validates its input with Python control
    flow, so timm's tracer keeps it whole (as timm does for its own PatchEmbed)."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # older timm
        return
    from .architecture import PatchEmbed

    register_notrace_module(PatchEmbed)


def is_registered() -> bool:
    """Whether timm's registry holds our constructors under the eight names."""
    from timm.models import model_entrypoint

    from .deit import CONSTRUCTORS

    return all(model_entrypoint(n) is fn for n, fn in CONSTRUCTORS.items())


def register_entry_points(replace: bool = False) -> list[str]:
    """Install every model published in the entry-point group ``timm.models`` into timm's registry.

    Any distribution can publish a model the way this package publishes its eight (``pyproject.toml``)::

        [project.entry-points."timm.models"]
        my_net = "my_package.models:my_net"      # a function (pretrained=False, **kwargs) -> nn.Module

    then ``deit_registry.register_entry_points()`` makes ``timm.create_model("my_net")`` work. A published
    function's ``pretrained_cfg`` attribute (a dict or ``PretrainedCfg``), or its module's timm-style
    ``default_cfgs``, becomes its pretrained cfg. A name timm already has is kept as timm's (with a warning)
    unless ``replace=True``; our eight DeiT names always get our constructors. A broken publisher only warns.
    Returns the names installed.
    """
    import sys

    from timm.models import PretrainedCfg
    from timm.models import _registry as reg

    register_with_timm()
    installed = []
    for name, fn in sorted(load_entry_points().items()):
        if name in VARIANTS:
            if fn is not reg._model_entrypoints.get(name):
                _install(reg, name, fn, TIMM_MODULE, {PRETRAINED_TAG: timm_pretrained_cfg(name)})
            installed.append(name)
            continue
        if name in reg._model_entrypoints and reg._model_entrypoints[name] is not fn and not replace:
            warnings.warn(
                f"entry point {name!r} ({getattr(fn, '__module__', '?')}) is not installed into timm: timm already "
                "has a model of that name. Pass replace=True to use the published one",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        module_name = getattr(fn, "__module__", "") or ""
        cfg = getattr(fn, "pretrained_cfg", None)
        cfgs = None
        if isinstance(cfg, dict):
            cfg = PretrainedCfg(**cfg)
        if isinstance(cfg, PretrainedCfg):
            cfgs = {(cfg.tag or ""): cfg}
        else:
            mod_cfgs = getattr(sys.modules.get(module_name), "default_cfgs", None)
            default = mod_cfgs.get(name) if isinstance(mod_cfgs, dict) else None
            if default is not None and hasattr(default, "tags"):
                cfgs = {t: default.cfgs[t] for t in default.tags}
        _install(reg, name, fn, module_name.rsplit(".", 1)[-1], cfgs)
        if cfgs and "" in cfgs:  # an untagged cfg is the architecture's own entry, as in timm
            reg._model_with_tags[name] = [name]
            reg._model_pretrained_cfgs.pop(f"{name}.", None)
            reg._model_has_pretrained.discard(f"{name}.")
        installed.append(name)
    return installed


# ------------------------------------------------------------------------------------------------ errors
def _patch_unknown_model_error() -> None:
    """Make ``timm.create_model("deit_smal_patch16_224")`` name the close matches.

    timm raises ``RuntimeError("Unknown model (...)")`` from ``_resolve_model_source``; we wrap that one function
    so the error stays a ``RuntimeError`` (and a :class:`~deit_registry.errors.UnknownModelError`) with a hint.
    """
    if _state["patched_factory"]:
        return
    from timm.models import _factory

    original = getattr(_factory, "_resolve_model_source", None)
    if original is None or getattr(original, "_deit_registry_wrapped", False):
        _state["patched_factory"] = True
        return

    def _resolve_model_source(model_name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(model_name, *args, **kwargs)
        except RuntimeError as exc:
            if not str(exc).startswith("Unknown model"):
                raise
            raise unknown_timm_model(model_name) from None

    _resolve_model_source._deit_registry_wrapped = True  # type: ignore[attr-defined]
    _resolve_model_source.__wrapped__ = original  # type: ignore[attr-defined]
    _factory._resolve_model_source = _resolve_model_source
    _state["patched_factory"] = True


def unknown_timm_model(name: str) -> UnknownTimmModelError:
    """The error for a name timm does not know, with up to five close names from timm's whole registry."""
    import timm

    names = timm.list_models()
    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, names, n=5, cutoff=0.6)
    if not close:
        close = [n for n in names if base and base in n][:5]
    return UnknownTimmModelError(name, close, len(names))


# ------------------------------------------------------------------------------------------ construction
@contextlib.contextmanager
def _cache_dir_scope(cache_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    """timm's ``cache_dir=``: downloads land in ``cache_dir/checkpoints`` (URLs) or ``cache_dir`` (hub)."""
    if cache_dir is None:
        yield
        return
    import torch.hub

    # Restore torch.hub's own setting (None unless set_dir was called), not get_dir()'s answer: pinning that
    # would stop later TORCH_HOME changes from taking effect.
    previous_dir, previous_env = getattr(torch.hub, "_hub_dir", None), os.environ.get("HF_HUB_CACHE")
    torch.hub.set_dir(os.fspath(cache_dir))
    os.environ["HF_HUB_CACHE"] = os.fspath(cache_dir)
    try:
        yield
    finally:
        torch.hub._hub_dir = previous_dir
        if previous_env is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = previous_env


def _weights_source(variant: Variant, cfg: Any, explicit: Any) -> Any:
    """Which checkpoint a timm pretrained cfg points at: None means this variant's official weights."""
    if explicit is not None:
        return explicit
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
            f"{variant.name}: the pretrained cfg names no weights (url, file, hf_hub_id or state_dict are all "
            "empty); set one in pretrained_cfg_overlay or pass pretrained=False"
        )
    return None


def build_timm_model(
    name: str,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: Any = None,
    out_indices: Any = 3,
    **kwargs: Any,
) -> Any:
    """Build variant ``name`` the way timm builds its models (``build_model_with_cfg``), for ``timm.create_model``.

    Accepts timm's factory keywords (``pretrained_cfg``, ``pretrained_cfg_overlay`` incl. ``file=``,
    ``cache_dir``, ``features_only``, ``out_indices``, ``feature_cls``, ``device``, ``dtype``) and every
    :class:`~deit_registry.architecture.DeiT` option. The returned model carries ``pretrained_cfg``; with
    ``features_only=True`` it is timm's ``FeatureGetterNet`` giving NCHW stride-16 maps of the blocks
    ``out_indices`` (an int n: the last n).
    """
    import torch
    from timm.models import build_model_with_cfg, resolve_pretrained_cfg

    from .architecture import DeiT

    variant = VARIANTS[name]
    if not is_registered_name(name):  # called directly, before timm knew us: the cfg lookup needs our entry
        register_with_timm()
    options: dict[str, Any] = variant.model_kwargs()
    options.update(kwargs)
    if weights is not None and not pretrained:
        raise ValueError("weights= names a checkpoint to load; pass pretrained=True as well")
    source = None
    if pretrained:
        cfg = resolve_pretrained_cfg(
            name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay
        )
        source = _weights_source(variant, cfg, weights)

    def construct(device: Any = None, dtype: Any = None, **model_options: Any) -> DeiT:
        place = torch.device(device) if device is not None else contextlib.nullcontext()
        with place:
            if pretrained:
                from .weights import load_pretrained

                with _cache_dir_scope(cache_dir):
                    model = load_pretrained(variant, model_options, source=source)
                if device is not None:
                    model.to(device)
            else:
                model = DeiT(**model_options)
        if dtype is not None:
            model.to(dtype=dtype)
        return model

    return build_model_with_cfg(
        construct,
        name,
        pretrained=False,  # weights are loaded by construct(), before any features_only wrapping
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        cache_dir=cache_dir,
        **options,
    )


def is_registered_name(name: str) -> bool:
    from timm.models import _registry as reg

    from .deit import CONSTRUCTORS

    return reg._model_entrypoints.get(name) is CONSTRUCTORS.get(name)


__all__ = [
    "ENTRY_POINT_GROUP",
    "TIMM_KEYWORDS",
    "UnknownTimmModelError",
    "build_timm_model",
    "is_registered",
    "register_entry_points",
    "register_with_timm",
    "timm_pretrained_cfg",
    "unknown_timm_model",
]
