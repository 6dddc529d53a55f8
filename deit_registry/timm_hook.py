"""Register this package's models with timm the moment timm is imported, without importing timm ourselves.

``import deit_registry`` calls :func:`install`: if timm is already imported the eight DeiT models replace timm's
own right away; otherwise a one-shot ``sys.meta_path`` finder wraps timm's loader, lets timm finish importing,
registers, and removes itself. Either import order gives the same registry::

    import deit_registry, timm          # or: import timm, deit_registry
    timm.create_model("deit_small_patch16_224")   # deit_registry.DeiT

This module imports only the standard library (``import deit_registry`` must stay quick).
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType
from typing import Any


def _register() -> None:
    try:
        from .timm_adapter import register_with_timm

        register_with_timm()
    except Exception as exc:  # never break the user's `import timm` because of us
        warnings.warn(
            f"deit_registry could not register its models with timm ({exc!r}); timm's own deit_* models stay "
            "in place. Call deit_registry.timm_adapter.register_with_timm() to see the full error",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader:
    """Wraps timm's own loader: runs it, hands the module back its real loader, then registers."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            # importlib.resources and pkgutil should see timm's loader, not this wrapper
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        _register()


class TimmImportHook:
    """One-shot meta-path finder for the top-level ``timm`` package; removes itself on first use."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        uninstall_hook()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def hook_installed() -> bool:
    """Whether the finder is waiting for ``import timm``."""
    return any(isinstance(f, TimmImportHook) for f in sys.meta_path)


def uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmImportHook)]


def install() -> None:
    """Register now if timm is imported, else wait for it (idempotent; called by ``import deit_registry``)."""
    timm = sys.modules.get("timm")
    if timm is not None:
        if hasattr(timm, "create_model"):  # fully imported (not mid-import of timm itself)
            _register()
        return
    if not hook_installed():
        sys.meta_path.insert(0, TimmImportHook())
