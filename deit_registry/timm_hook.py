"""Register this package's models with timm as soon as timm's model registry exists, in any import order.

``import deit_registry`` calls :func:`install`. If ``timm.models`` is already imported, our eight models
replace timm's own right away. Otherwise a ``sys.meta_path`` finder waits for ``timm.models`` to be executed:
it wraps the loader the other finders return, registers once the module has run, and only then removes itself.
Looking timm up without importing it (``importlib.util.find_spec("timm")``, as transformers does on import;
``pkgutil``) leaves it waiting. Every order gives the same registry::

    import deit_registry, transformers, timm     # or: import timm, deit_registry
    timm.create_model("deit_small_patch16_224")   # deit_registry.DeiT

A failure to register never passes silently: it is a ``RuntimeWarning`` naming the fix,
``deit_registry.register_with_timm()``, or, where ``DEIT_REGISTRY_REQUIRE_TIMM=1`` (``deit-registry run`` sets
it for the script and the processes it starts), a :class:`~deit_registry.errors.TimmRegistrationError` from the
import itself. This module imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

from .errors import TimmRegistrationError

TARGET = "timm.models"  # the registry and the public register_model live here; timm's __init__ imports it
FIX = "call deit_registry.register_with_timm() once timm is imported"
REQUIRE_ENV = "DEIT_REGISTRY_REQUIRE_TIMM"  # "1": a failure to register raises instead of warning


def required() -> bool:
    """Whether a failure to register raises (``DEIT_REGISTRY_REQUIRE_TIMM=1``) rather than warns."""
    return os.environ.get(REQUIRE_ENV) == "1"


def _register() -> bool:
    try:
        from .timm_adapter import register_with_timm

        register_with_timm()
    except Exception as exc:
        if required():  # deit-registry run: the script must not go on with timm's own DeiT
            if isinstance(exc, TimmRegistrationError):
                raise
            raise TimmRegistrationError(
                f"registering the DeiT models with timm failed: {type(exc).__name__}: {exc}"
            ) from exc
        # otherwise never break the user's `import timm` because of us, but say so
        warnings.warn(
            f"deit_registry could not register its models with timm ({exc!r}): timm.create_model('deit_*') "
            f"builds timm's own classes. To see the full error, {FIX}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


class _RegisteringLoader:
    """Wraps timm.models' own loader: runs it, hands the module back its real loader, then registers."""

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
        uninstall_hook()  # only now: timm.models has really been executed
        _register()


class TimmImportHook:
    """Meta-path finder for ``timm.models``; stays on ``sys.meta_path`` until that module has been executed."""

    _busy = threading.local()  # a finder below us may look timm up again: do not recurse

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TARGET or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find_spec = getattr(finder, "find_spec", None)
                if isinstance(finder, TimmImportHook) or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.active = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def hook_installed() -> bool:
    """Whether the finder is waiting for ``timm.models`` to be imported."""
    return any(isinstance(f, TimmImportHook) for f in sys.meta_path)


def uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmImportHook)]


def install() -> None:
    """Register now if ``timm.models`` is imported, else wait for it (idempotent; run by ``import deit_registry``).

    ``timm.models`` found half-executed (``deit_registry`` imported from inside timm's own import) cannot be
    waited for: that warns with the fix.
    """
    models = sys.modules.get(TARGET)
    if models is None:
        if not hook_installed():
            sys.meta_path.insert(0, TimmImportHook())
    elif hasattr(models, "register_model"):  # the last thing timm.models imports: fully executed
        _register()
    else:
        warnings.warn(
            "deit_registry was imported while timm.models was still being imported, so it cannot register its "
            f"models yet: timm.create_model('deit_*') builds timm's own classes until you {FIX}",
            RuntimeWarning,
            stacklevel=3,
        )
