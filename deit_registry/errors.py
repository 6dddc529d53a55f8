"""Exceptions a user can cause. Every one derives from :class:`DeiTRegistryError`, so
``except deit_registry.DeiTRegistryError`` catches them all; each message names the problem and the fix."""

from __future__ import annotations


class DeiTRegistryError(Exception):
    """Base class of every error raised by deit_registry."""


class UnknownModelError(DeiTRegistryError, ValueError):
    """No model of that name is registered; the message lists the closest names."""

    def __init__(self, name: str, suggestions: list[str], known: int) -> None:
        self.name = name
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"unknown model {name!r} ({known} models are registered).{hint} "
            "See deit_registry.list_models() for every name."
        )


class ModelImportError(DeiTRegistryError, ImportError):
    """A model published through an entry point could not be imported."""
