"""Where weights come from: turn a source into a local path, downloading into a cache when needed.

Sources (:func:`resolve`):

* ``None`` - the variant's official file, ``<DEIT_REGISTRY_URL_ROOT or https://dl.fbaipublicfiles.com/deit/>
  <name>-<hash8>.pth``, cached in torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``);
* an ``http(s)://`` URL - the same downloader and cache; a name ending ``-<hex>.ext`` has its sha256 prefix
  checked like torch.hub's ``check_hash``;
* ``hf-hub:owner/repo[@revision]`` - through ``huggingface_hub`` (its cache, progress bar, offline mode);
* a local file or folder - used as it is.

Downloads go to a temporary file in the cache folder and are renamed into place only when complete and
hash-checked, under a file lock, so a dropped connection never leaves a corrupt file and two processes asking
for the same file download it once::

    from deit_registry.weights.sources import resolve
    path = resolve("deit_tiny_patch16_224", None)    # ~/.cache/torch/hub/checkpoints/deit_tiny_...-a1311bcf.pth
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointNotFoundError, DownloadError, HashMismatchError, OfflineError
from ..variants import OFFICIAL_URL_ROOT, VARIANTS, Variant

HF_PREFIX = "hf-hub:"
# Files tried in a hub repository, best first: safetensors never runs code.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")
_TRUE = ("1", "on", "yes", "true")
TIMEOUT_S = 30.0


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``DEIT_REGISTRY_OFFLINE`` set to 1/true/yes/on (read at call time)."""
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "DEIT_REGISTRY_OFFLINE")
    )


def official_url(variant: Variant) -> str:
    """The variant's checkpoint URL; ``DEIT_REGISTRY_URL_ROOT`` replaces Meta's CDN (mirrors, tests)."""
    root = os.environ.get("DEIT_REGISTRY_URL_ROOT", OFFICIAL_URL_ROOT)
    return root.rstrip("/") + "/" + variant.weights.file_name


def cache_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), the folder timm and torchvision use."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(variant: Variant) -> Path:
    return cache_dir() / variant.weights.file_name


def get_variant(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    base = name.split(".", 1)[0]
    if base not in VARIANTS:
        raise ValueError(f"unknown DeiT variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[base]


def resolve(
    variant: str | Variant | None, source: str | os.PathLike[str] | None, progress: bool = True
) -> Path:
    """A local path (file or folder) holding the weights of ``source`` (see the module docstring)."""
    if source is None:
        if variant is None:
            raise ValueError("resolve() needs a variant name when no source is given")
        v = get_variant(variant)
        return fetch_url(official_url(v), hash_prefix=v.weights.sha256_prefix, progress=progress)
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        return fetch_hf_hub(text[len(HF_PREFIX) :], progress=progress)
    if text.startswith(("http://", "https://")):
        name = Path(urllib.parse.urlparse(text).path).name
        match = _HASH_IN_NAME.search(name)
        return fetch_url(text, hash_prefix=match.group(1) if match else None, progress=progress)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {text!r} does not exist. Pass an existing .pth/.bin/.safetensors file or folder, an "
            f"http(s) URL, or 'hf-hub:owner/repo'"
        )
    return path


# ------------------------------------------------------------------------------------------- URL downloads
@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs (fcntl on POSIX, msvcrt on Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fetch_url(
    url: str, hash_prefix: str | None = None, progress: bool = True, directory: Path | None = None
) -> Path:
    """Download ``url`` into the cache once (locked, atomic, hash-checked) and return the cached file."""
    directory = directory or cache_dir()
    dst = directory / Path(urllib.parse.urlparse(url).path).name
    if dst.is_file():
        return dst
    if is_offline():
        raise OfflineError(
            f"offline mode (HF_HUB_OFFLINE / DEIT_REGISTRY_OFFLINE) and {dst.name} is not cached in {directory}. "
            f"Unset offline mode, or download it elsewhere from {url} and copy it to {dst} (or pass weights=PATH)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / (dst.name + ".lock")):
        if dst.is_file():  # another process finished it while we waited for the lock
            return dst
        _download(url, dst, hash_prefix, progress)
    return dst


def _download(url: str, dst: Path, hash_prefix: str | None, progress: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".partial", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        sha = hashlib.sha256()
        received = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "deit-registry"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, os.fdopen(fd, "wb") as out:
                fd = -1
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = _progress_bar(total, dst.name) if progress else None
                try:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        sha.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
        except urllib.error.HTTPError as e:
            raise DownloadError(
                f"downloading {dst.name} from {url} failed: HTTP {e.code} {e.reason}. Check the URL (or "
                f"DEIT_REGISTRY_URL_ROOT) and try again, or download the file yourself and pass weights=PATH"
            ) from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(
                f"downloading {dst.name} from {url} failed: {reason}. Check the network connection and try "
                f"again, or download the file yourself and pass weights=PATH"
            ) from e
        if total is not None and received != total:
            raise DownloadError(
                f"downloading {dst.name} from {url} failed: the connection dropped after {received} of {total} "
                f"bytes. Nothing was cached; try again"
            )
        digest = sha.hexdigest()
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise HashMismatchError(
                f"{dst.name} from {url}: sha256 {digest[: len(hash_prefix)]}... does not match the "
                f"{hash_prefix} in its name, so the download is corrupt or was tampered with; it was deleted. "
                f"Try again, or check the mirror set in DEIT_REGISTRY_URL_ROOT"
            )
        os.replace(tmp, dst)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _progress_bar(total: int | None, name: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)


# ---------------------------------------------------------------------------------------- Hugging Face Hub
def split_hub_id(hub_id: str) -> tuple[str, str | None]:
    """``owner/repo@revision`` -> ``("owner/repo", "revision")``."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def _hf_cache_dir() -> str | None:
    # huggingface_hub reads HF_HOME / HF_HUB_CACHE once at import; honour changes made after that.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def fetch_hf_hub(hub_id: str, progress: bool = True) -> Path:
    """Fetch a hub repository's weights (and ``config.json`` if it has one); return its snapshot folder.

    The weights file is the first of :data:`HUB_WEIGHT_FILES` the repository has, so transformers' repos
    (``facebook/deit-*``) and timm's (``timm/<name>.fb_in1k``) both work; ``@revision`` pins a branch, tag
    or commit.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (  # LocalEntryNotFoundError subclasses EntryNotFoundError
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = split_hub_id(hub_id)
    offline = is_offline()
    kwargs = dict(
        repo_id=repo,
        revision=revision,
        cache_dir=_hf_cache_dir(),
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        local_files_only=offline,
    )
    where = f"hf-hub:{hub_id}"
    unreachable: list[Exception] = []

    def get(filename: str) -> Path | None:
        """The cached file, or None if the repository (or the local cache, offline) does not have it."""
        try:
            return Path(hf_hub_download(filename=filename, **kwargs))
        except LocalEntryNotFoundError as e:  # offline or unreachable, and not cached
            unreachable.append(e)
            return None
        except EntryNotFoundError:  # the repository has no such file
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise CheckpointNotFoundError(
                f"{where}: {type(e).__name__}: the repository or revision does not exist (or needs a token). "
                f"Check the id, e.g. 'hf-hub:timm/deit_tiny_patch16_224.fb_in1k'"
            ) from e
        except (HfHubHTTPError, OSError) as e:
            raise DownloadError(f"downloading {filename} of {where} failed: {e}. Try again") from e

    with _hub_progress(progress):
        for filename in HUB_WEIGHT_FILES:
            weights = get(filename)
            if weights is not None:
                get("config.json")  # transformers' configs carry layer_norm_eps; timm's the architecture
                return weights.parent
    if offline:
        raise OfflineError(
            f"offline mode (HF_HUB_OFFLINE / DEIT_REGISTRY_OFFLINE) and {where} has no weights file "
            f"({', '.join(HUB_WEIGHT_FILES)}) in the Hugging Face cache. Unset offline mode once to download "
            f"it, or pass weights=PATH"
        )
    if unreachable:
        raise DownloadError(
            f"could not download the weights of {where} from the Hub ({kwargs['endpoint'] or 'huggingface.co'}) "
            f"and they are not cached: {unreachable[0]}. Check the network (or HF_ENDPOINT) and try again"
        )
    raise CheckpointNotFoundError(
        f"{where} has none of {', '.join(HUB_WEIGHT_FILES)}. Pass the URL of its weights file instead"
    )


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
