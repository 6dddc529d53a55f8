"""torch.hub support for ``hubconf.py``: building a variant and helpful errors for mistyped entry names.

torch.hub looks an entry up with ``name in dir(hubconf)`` and, if absent, raises ``RuntimeError("Cannot find
callable ... in hubconf")`` with no hint. :func:`suggest_close_entries` gives the hubconf module a ``__dir__``
that, when torch.hub asks for a name it lacks, raises :class:`~deit_registry.errors.UnknownModelError` listing the
close names instead::

    torch.hub.load("facebookresearch/deit-registry", "deit_smal_patch16_224")
    # UnknownModelError: unknown model 'deit_smal_patch16_224' (8 models are registered).
    #   Did you mean: deit_small_patch16_224, ...?

This module imports only the standard library and this package (hubconf must work without timm).
"""

from __future__ import annotations

import difflib
import sys
from types import ModuleType
from typing import Any

from .errors import UnknownModelError


def hub_entries(module: ModuleType) -> list[str]:
    """The public callables of a hubconf module: what ``torch.hub.list`` shows."""
    return sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))


def _requested_name() -> str | None:
    """The name torch.hub's ``_load_attr_from_module`` is looking up, if that is who called ``dir()``."""
    frame = sys._getframe(2)  # 0: here, 1: __dir__, 2: the caller of dir() (builtins have no frame)
    if frame.f_code.co_name != "_load_attr_from_module" or frame.f_globals.get("__name__") != "torch.hub":
        return None
    name = frame.f_locals.get("func_name")
    return name if isinstance(name, str) else None


class _HubModule(ModuleType):
    def __dir__(self) -> list[str]:
        names = sorted(vars(self))
        requested = _requested_name()
        if requested is not None and requested not in names:
            entries = hub_entries(self)
            close = difflib.get_close_matches(requested, entries, n=5, cutoff=0.5)
            if not close:
                close = [n for n in entries if requested in n][:5]
            raise UnknownModelError(requested, close, len(entries))
        return names


def _module_of(namespace: dict[str, Any]) -> ModuleType | None:
    """The module whose globals are ``namespace``: torch.hub runs hubconf without putting it in sys.modules,
    so look for it among the importing frames' locals (importlib's ``exec_module(module)``)."""
    module = sys.modules.get(namespace.get("__name__", ""))
    if module is not None and module.__dict__ is namespace:
        return module
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("module")
        if isinstance(candidate, ModuleType) and candidate.__dict__ is namespace:
            return candidate
        frame = frame.f_back
    return None


def suggest_close_entries(namespace: dict[str, Any]) -> None:
    """Make ``torch.hub.load(repo, "mistyped_name")`` list the close entry names; call with ``globals()``."""
    module = _module_of(namespace)
    if module is not None and type(module) is ModuleType:
        module.__class__ = _HubModule


def build(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """Build the variant ``name`` (a hubconf entry's body): options as :func:`deit_registry.create_model`."""
    from .deit import build_deit

    return build_deit(name, pretrained, **kwargs)
