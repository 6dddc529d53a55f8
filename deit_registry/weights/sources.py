"""Where weights come from: turn a source into a local path, downloading into a cache when needed.

Sources (:func:`resolve`):

* ``None`` - the variant's weights in the default order, like timm: timm's copy on the Hugging Face Hub
  (``hf-hub:timm/<name>.fb_in1k``, file ``model.safetensors``, through huggingface_hub so its cache,
  ``HF_ENDPOINT`` mirrors, tokens and ``HF_HUB_OFFLINE`` apply), then the official file
  ``<DEIT_REGISTRY_URL_ROOT or https://dl.fbaipublicfiles.com/deit/><name>-<hash8>.pth`` (sha256-prefix
  checked, cached in ``$TORCH_HOME/hub/checkpoints``) when the Hub cannot be reached or lacks the file. Offline,
  whichever of the two caches holds the weights is used, else :class:`~deit_registry.errors.OfflineError` at
  once. Without huggingface_hub and safetensors (torch alone, e.g. torch.hub) the official file is used;
* an ``http(s)://`` URL - downloaded into a cache folder of its own (:mod:`.urlfetch`); a name ending
  ``-<hex>.ext`` has its sha256 prefix checked like torch.hub's ``check_hash``;
* ``hf-hub:owner/repo[@revision]`` - through huggingface_hub, never rerouted (:mod:`.hubfetch`);
* a local file or folder - used as it is.

Every download is bounded in time (:mod:`.netlimits`) and validated before it takes its final name::

    from deit_registry.weights.sources import resolve
    path = resolve("deit_tiny_patch16_224", None)   # .../models--timm--deit_tiny_patch16_224.fb_in1k/.../model.safetensors
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.parse
import warnings
from pathlib import Path

from ..errors import (
    CheckpointNotFoundError,
    DownloadError,
    HubUnreachableError,
    InvalidSourceError,
    MissingDependencyError,
    OfflineError,
)
from ..variants import OFFICIAL_URL_ROOT, Variant, get_variant
from . import hubfetch, urlfetch
from .formats import WEIGHT_FILE_NAMES
from .hubfetch import split_hub_id
from .netlimits import FIXES
from .urlfetch import cache_dir, fetch_url, is_offline

__all__ = [
    "HF_PREFIX",
    "cache_dir",
    "cached_path",
    "fetch_hf_hub",
    "fetch_url",
    "hub_repo",
    "is_cached",
    "is_offline",
    "official_url",
    "resolve",
    "split_hub_id",
]

logger = logging.getLogger(__name__)
HF_PREFIX = "hf-hub:"
_fallback_warned: set[str] = set()


def official_url(variant: Variant) -> str:
    """The variant's checkpoint URL; ``DEIT_REGISTRY_URL_ROOT`` replaces Meta's CDN (mirrors, tests)."""
    root = os.environ.get("DEIT_REGISTRY_URL_ROOT", "").strip() or OFFICIAL_URL_ROOT  # "" is unset
    parts = urllib.parse.urlparse(root)
    if not ((parts.scheme in ("http", "https") and parts.hostname) or parts.scheme == "file"):
        raise InvalidSourceError(
            f"DEIT_REGISTRY_URL_ROOT={root!r} is not an http(s):// or file:// URL. Set it to the folder URL of "
            f"a mirror of the official files, e.g. {OFFICIAL_URL_ROOT}, or unset it"
        )
    return root.rstrip("/") + "/" + variant.weights.file_name


def hub_repo(variant: Variant) -> str:
    """timm's Hub repository of the variant's ImageNet-1k weights, e.g. ``timm/deit_tiny_patch16_224.fb_in1k``."""
    return variant.weights.hf_hub_id


def cached_path(variant: Variant) -> Path:
    """Where the default order would find ``variant``'s weights without a download: the Hub cache's file if
    it has one, else the official file's place in torch.hub's cache (which may not exist)."""
    if hubfetch.available():
        found = hubfetch.cached_file(hub_repo(variant), variant.weights.hf_hub_filename)
        if found is not None:
            return found
    return urlfetch.cache_dir() / variant.weights.file_name  # as fetch_url(shared=True); no root needed


def is_cached(name: str | Variant) -> bool:
    """Whether the default order finds the weights of ``name`` locally (Hub cache or torch.hub's cache)."""
    return cached_path(get_variant(name)).is_file()


def resolve(
    variant: str | Variant | None, source: str | os.PathLike[str] | None, progress: bool = True
) -> Path:
    """A local path (file or folder) holding the weights of ``source`` (see the module docstring)."""
    if source is None:
        if variant is None:
            raise ValueError("resolve() needs a variant name when no source is given")
        return default_weights(get_variant(variant), progress)
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        return fetch_hf_hub(text[len(HF_PREFIX) :], progress=progress)
    if text.startswith(("http://", "https://")):
        name = urlfetch.file_name(text)
        _require_safetensors(name)
        match = urlfetch.HASH_IN_NAME.search(name)
        return fetch_url(text, hash_prefix=match.group(1) if match else None, progress=progress)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {text!r} does not exist. Pass an existing .pth/.bin/.safetensors file or folder, an "
            f"http(s) URL, or 'hf-hub:owner/repo'"
        )
    _require_safetensors(path.name)
    return path


def _require_safetensors(name: str) -> None:
    if name.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise MissingDependencyError(
            f"{name} is a safetensors file, which needs the safetensors package: pip install huggingface_hub "
            f"safetensors"
        )


def default_weights(variant: Variant, progress: bool = True) -> Path:
    """The variant's weights in the default order (module docstring): the Hub, then the official file."""
    url = official_url(variant)
    repo = hub_repo(variant)
    if not hubfetch.available():  # torch alone: the official file, as torch.hub always did
        return fetch_url(url, hash_prefix=variant.weights.sha256_prefix, progress=progress, shared=True)
    if is_offline():  # the Hub cache as an explicit hf-hub: id sees it, then torch.hub's
        try:
            return hubfetch.fetch(repo, variant.weights.hf_hub_filename, progress=progress)
        except OfflineError as hub_error:
            damaged = hubfetch.cached_file(repo, variant.weights.hf_hub_filename) is not None
            try:
                found = fetch_url(
                    url, hash_prefix=variant.weights.sha256_prefix, progress=progress, shared=True
                )
            except OfflineError as e:
                official = urlfetch.cache_path(url, shared=True)
                if official.is_file():  # damaged: its own message says why and what to do
                    raise OfflineError(f"{e} (the Hub copy was looked for first: {hub_error})") from e
                raise OfflineError(
                    f"the weights of {variant.name} are not in torch.hub's cache ({official}) either: {hub_error}"
                ) from e
            if damaged:
                warnings.warn(f"{variant.name}: {hub_error}; using torch.hub's copy {found}", stacklevel=3)
            return found
    try:
        found = hubfetch.fetch(repo, variant.weights.hf_hub_filename, progress=progress)
        assert found is not None
        return found
    # unreachable, stalled, 5xx, no such file; or huggingface_hub imported offline (OfflineError) and not cached
    except (DownloadError, CheckpointNotFoundError, OfflineError) as e:
        reason = str(e).split(". ")[0]
        unreachable = isinstance(e, HubUnreachableError)
        # An unreachable Hub is the normal case behind a firewall: logged. A Hub that answers but fails is not:
        # warned, once per variant and process.
        if not unreachable and variant.name not in _fallback_warned:
            _fallback_warned.add(variant.name)
            warnings.warn(
                f"{variant.name}: the Hub copy (hf-hub:{repo}) could not be used ({reason}); using the official "
                f"file from {urllib.parse.urlparse(url).netloc} instead",
                stacklevel=3,
            )
        logger.info("%s: the Hub copy could not be used (%s); weights from %s", variant.name, reason, url)
        try:
            return fetch_url(url, hash_prefix=variant.weights.sha256_prefix, progress=progress, shared=True)
        except DownloadError as fallback_error:
            raise DownloadError(
                f"{fallback_error} (the Hub copy hf-hub:{repo} was tried first: {reason})"
            ) from fallback_error


def fetch_hf_hub(hub_id: str, progress: bool = True) -> Path:
    """Fetch an explicit hub repository's weights (and ``config.json`` if it has one); return its snapshot
    folder. The weights file is the first of :data:`WEIGHT_FILE_NAMES` the repository has, so transformers'
    repos (``facebook/deit-*``) and timm's (``timm/<name>.fb_in1k``) both work; ``@revision`` pins a branch,
    tag or commit. The whole call shares one deadline (``DEIT_REGISTRY_DOWNLOAD_TIMEOUT``).
    """
    hubfetch.require()
    from .netlimits import Deadline, download_timeout

    repo, revision = split_hub_id(hub_id)
    deadline = Deadline(download_timeout())
    # the first file that neither the Hub nor its cache gave
    miss: OfflineError | HubUnreachableError | None = None

    def fetch(filename: str) -> Path | None:
        """The file; None if the repository lacks it, or (offline, the Hub unreachable) the cache does."""
        nonlocal miss
        try:
            return hubfetch.fetch(
                repo, filename, revision, progress=progress, deadline=deadline, missing_ok=True
            )
        except (OfflineError, HubUnreachableError) as e:
            if hubfetch.cached_file(repo, filename, revision) is not None:  # cached but damaged: never loaded
                raise
            miss = miss or e  # another file of the repository may be cached
            return None

    for filename in WEIGHT_FILE_NAMES:
        weights = fetch(filename)
        if weights is not None:
            fetch("config.json")  # transformers' configs carry layer_norm_eps; timm's the architecture
            return weights.parent
    files = f"has no weights file ({', '.join(WEIGHT_FILE_NAMES)}) in the Hugging Face cache"
    if isinstance(miss, HubUnreachableError):
        host = urllib.parse.urlparse(hubfetch.endpoint()).netloc
        raise HubUnreachableError(
            f"cannot connect to the Hub at {host}, and hf-hub:{hub_id} {files}. {FIXES}"
        ) from miss
    if miss is not None:
        why, fix = hubfetch.offline_reason()
        raise OfflineError(
            f"{why} and hf-hub:{hub_id} {files}. {fix} to download it, or pass weights=PATH"
        ) from miss
    raise CheckpointNotFoundError(
        f"hf-hub:{hub_id} has none of {', '.join(WEIGHT_FILE_NAMES)}. Pass the URL of its weights file instead"
    )
