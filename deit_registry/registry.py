"""A timm-style model registry fed by Python entry points.

Models come from three places, all found lazily:

* the eight DeiT variants of this package (the variant table; no model code is imported to list them);
* every entry point of the group ``timm.models`` of any installed distribution
  (``name = "package.module:function"``), loaded only when that model is created;
* functions decorated with :func:`register_model` at run time.

::

    import deit_registry as dr
    dr.list_models("deit_*distilled*")          # names, no model code imported
    model = dr.create_model("deit_tiny_patch16_224", num_classes=10)
    dr.get_pretrained_cfg("deit_tiny_patch16_224").weights.top1     # 72.2
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Callable, Iterable
from functools import cache
from importlib import metadata
from typing import Any

from .errors import ModelImportError, UnknownModelError
from .variants import PRETRAINED_TAG, VARIANTS, Variant, get_variant

ENTRY_POINT_GROUP = "timm.models"

ModelFn = Callable[..., Any]
_registered: dict[str, ModelFn] = {}
_registered_cfgs: dict[str, Any] = {}


def register_model(
    fn: ModelFn | None = None, *, name: str | None = None, pretrained_cfg: Any = None
) -> ModelFn | Callable[[ModelFn], ModelFn]:
    """Register a model constructor (usable as ``@register_model`` or ``@register_model(name=...)``).

    ``pretrained_cfg`` (any object) is what :func:`get_pretrained_cfg` returns for it; giving one marks the
    model as having pretrained weights for ``list_models(pretrained=True)``.
    """

    def decorator(f: ModelFn) -> ModelFn:
        key = name or f.__name__
        _registered[key] = f
        if pretrained_cfg is not None:
            _registered_cfgs[key] = pretrained_cfg
        return f

    return decorator(fn) if fn is not None else decorator


@cache
def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def refresh_entry_points() -> None:
    """Forget the cached entry-point list (after installing a distribution at run time)."""
    _entry_points.cache_clear()


def _describe(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    package = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"model {ep.name!r} ({ep.value}) published by {package}"


def _load_entry_point(ep: metadata.EntryPoint) -> ModelFn:
    try:
        return ep.load()
    except Exception as exc:  # a broken third-party package must not take the registry down with it
        raise ModelImportError(
            f"{_describe(ep)} failed to import: {exc!r}. Reinstall or fix that package; other models are unaffected"
        ) from exc


def load_entry_points(names: Iterable[str] | None = None) -> dict[str, ModelFn]:
    """Import the published constructors (all, or ``names``); a broken one warns and is left out."""
    eps = _entry_points()
    loaded = {}
    for name in eps if names is None else names:
        try:
            loaded[name] = _load_entry_point(eps[name])
        except ModelImportError as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
    return loaded


def split_tag(name: str) -> tuple[str, str | None]:
    """``"deit_small_patch16_224.fb_in1k"`` -> ``("deit_small_patch16_224", "fb_in1k")``."""
    base, _, tag = name.partition(".")
    return base, tag or None


def _all_names() -> set[str]:
    return set(VARIANTS) | set(_entry_points()) | set(_registered)


def _has_pretrained(name: str) -> bool:
    if name in VARIANTS or name in _registered_cfgs:
        return True
    fn = _registered.get(name)
    if fn is None:
        fn = load_entry_points([name]).get(name)
    return bool(getattr(fn, "pretrained_cfg", None) or getattr(fn, "default_cfg", None))


def list_models(
    pattern: str | Iterable[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = (),
    include_tags: bool = False,
) -> list[str]:
    """Sorted model names matching the shell-style ``pattern`` (or any of several).

    ``pretrained=True`` keeps models with pretrained weights; ``include_tags=True`` lists them as
    ``name.fb_in1k``, the spelling timm uses for a weight tag.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = [
        n
        for n in _all_names()
        if (not patterns or any(fnmatch.fnmatch(n, p or "*") for p in patterns))
        and not any(fnmatch.fnmatch(n, x) for x in excludes)
    ]
    if pretrained:
        names = [n for n in names if _has_pretrained(n)]
    if include_tags:
        names = [f"{n}.{PRETRAINED_TAG}" if n in VARIANTS else n for n in names]
    return sorted(names)


def is_model(name: str) -> bool:
    """Whether ``name`` (optionally with its ``.fb_in1k`` tag) is a known model."""
    base, tag = split_tag(name)
    return base in _all_names() and (tag is None or base not in VARIANTS or tag == PRETRAINED_TAG)


def _unknown(name: str) -> UnknownModelError:
    names = sorted(_all_names())
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:  # substring matches catch e.g. "small_distilled" or a missing prefix
        close = [n for n in names if split_tag(name)[0] in n][:5]
    return UnknownModelError(name, close, len(names))


def model_entrypoint(name: str) -> ModelFn:
    """The constructor of ``name``, importing its module if it comes from an entry point."""
    base, _ = split_tag(name)
    if base in _registered:
        return _registered[base]
    if base in VARIANTS:  # ours directly: the same functions our entry points publish, installed or not
        from .deit import CONSTRUCTORS

        return CONSTRUCTORS[get_variant(name).name]
    eps = _entry_points()
    if base in eps:
        return _load_entry_point(eps[base])
    raise _unknown(name)


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """Build the model ``name`` (``"deit_small_patch16_224"`` or ``"deit_small_patch16_224.fb_in1k"``).

    ``kwargs`` go to the constructor: ``num_classes``, ``head``, ``img_size``, ``in_chans``, ``drop_rate``,
    ``drop_path_rate``, ``global_pool``, ``dynamic_img_size``, ``device``, ``dtype``, and with ``pretrained=True``
    ``weights=`` for a different checkpoint source (see :mod:`deit_registry.deit`). timm's factory options
    (``features_only``, ``pretrained_cfg``, ...) raise ``ValueError``: ``timm.create_model`` takes them and
    builds the same models once ``deit_registry`` is imported.
    """
    return model_entrypoint(name)(pretrained=pretrained, **kwargs)


def get_pretrained_cfg(name: str) -> Variant | Any:
    """The metadata record of ``name``: a :class:`~deit_registry.variants.Variant` for the DeiT variants."""
    base, _ = split_tag(name)
    if base in VARIANTS:
        return get_variant(name)
    if base in _registered_cfgs:
        return _registered_cfgs[base]
    if not is_model(base):
        raise _unknown(name)
    fn = model_entrypoint(base)
    return getattr(fn, "pretrained_cfg", None)
