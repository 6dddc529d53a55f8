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


class ModuleNotRunnableError(DeiTRegistryError, ImportError):
    """``deit-registry run -m NAME`` for a module that ``python -m`` would not run (not found, a package
    without ``__main__``...); the message is the one python prints."""


class TimmRegistrationError(DeiTRegistryError, RuntimeError):
    """timm is missing or did not take our models, so ``timm.create_model("deit_*")`` would build timm's own
    classes. Raised by ``register_with_timm()``, by ``deit-registry run``, and, where
    ``DEIT_REGISTRY_REQUIRE_TIMM=1``, by ``import timm`` itself instead of a warning."""


class WeightsError(DeiTRegistryError):
    """Base class of every error raised while finding, downloading, reading or loading weights
    (:mod:`deit_registry.weights`). Each message names the file or source, what was wrong and what to do."""


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    """A local checkpoint path does not exist, or a folder / hub repository holds no weights file."""


class DownloadError(WeightsError, OSError):
    """An HTTP error, an unreachable or stalled server (past ``DEIT_REGISTRY_DOWNLOAD_TIMEOUT``), a connection
    dropped mid-download, or a body that is not a checkpoint (an HTML page, a truncated file). Nothing is left
    cached; the message names the host and the fixes (a mirror, the offline cache, ``weights=PATH``)."""


class HubUnreachableError(DownloadError):
    """No connection to the Hugging Face Hub (``HF_ENDPOINT``) could be made and the file is not cached, or
    its cached copy is damaged. The default order then uses the official file; an ``hf-hub:`` id uses the
    first weights file of the repository that is cached."""


class InvalidSourceError(WeightsError, ValueError):
    """A source that cannot name weights: ``hf-hub:`` not of the form ``owner/repo[@revision]``, a URL with
    no file name, no host or a scheme urllib cannot fetch, or a file name too long to cache."""


class MissingDependencyError(WeightsError, ImportError):
    """The source needs an optional package (``huggingface_hub`` for ``hf-hub:``, ``safetensors`` for
    ``.safetensors`` files); the message says what to ``pip install``."""


class CheckpointNotReadableError(WeightsError, PermissionError):
    """A checkpoint file or folder this user may not read; the message names it and the fix."""


class CacheNotWritableError(WeightsError, PermissionError):
    """The download cache folder cannot be written; the message names it and how to move the cache
    (``TORCH_HOME``, ``HF_HUB_CACHE`` / ``HF_HOME``)."""


class HashMismatchError(WeightsError):
    """A downloaded file's sha256 does not start with the hash in its name (the file is deleted)."""


class OfflineError(WeightsError):
    """Offline mode (``HF_HUB_OFFLINE=1`` or ``DEIT_REGISTRY_OFFLINE=1``) and the weights are not cached."""


class CorruptCheckpointError(WeightsError):
    """A file that is truncated, damaged or in no format deit_registry reads."""


class UnsafeCheckpointError(WeightsError):
    """A pickle that would have to run code (or build arbitrary objects) to load; it is refused unexecuted."""


class CheckpointMismatchError(WeightsError):
    """The checkpoint does not fit the model: another variant (shape mismatch), missing or unexpected keys."""


class DistillationMismatchError(CheckpointMismatchError):
    """Distilled weights into a plain model or the reverse, without ``convert_distillation=True``."""
