"""Files from the Hugging Face Hub through ``huggingface_hub.hf_hub_download`` (its cache, ``HF_ENDPOINT``
mirrors, tokens, offline mode, locks and etags), with what it lacks added around it:

* an overall deadline (``DEIT_REGISTRY_DOWNLOAD_TIMEOUT``): huggingface_hub bounds each request
  (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``) but retries connection errors and HTTP 5xx with
  back-off (about 25 s when the host does not resolve, over 90 s for a 500), and has no limit on a whole call;
* a quick reachability check of the endpoint (one TCP connect), so an unreachable Hub falls back at once;
* one more try when the connection is cut under a request (see ``fetch``);
* our errors with the fix, instead of huggingface_hub's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sys
import time
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
    WeightsError,
)
from . import netlimits
from .netlimits import FIXES, Deadline

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: dict[str, tuple[float, bool]] = {}  # endpoint -> (checked at, reachable), kept 30 s


def available() -> bool:
    """Whether the Hub path can be used here: huggingface_hub to fetch, safetensors to read the file."""
    return all(importlib.util.find_spec(m) is not None for m in ("huggingface_hub", "safetensors"))


def require() -> None:
    if importlib.util.find_spec("huggingface_hub") is None:
        raise MissingDependencyError(
            "an 'hf-hub:' source needs the huggingface_hub package: pip install huggingface_hub safetensors "
            "(or pass the URL or local path of the weights file instead)"
        )


def imported_offline() -> bool:
    """Whether huggingface_hub was imported in offline mode: it reads ``HF_HUB_OFFLINE`` once, at import
    (its public ``constants``), and then refuses every request of the process, whatever the variable says now."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def offline_reason() -> tuple[str, str]:
    """Why a Hub call is offline, and what makes it download: for the messages of a cache miss."""
    from .urlfetch import is_offline

    if is_offline():
        return "offline mode (HF_HUB_OFFLINE / DEIT_REGISTRY_OFFLINE)", "Unset offline mode once"
    return (
        "huggingface_hub was imported in offline mode (HF_HUB_OFFLINE=1 at import; it makes no request in "
        "this process)",
        "Restart the process without HF_HUB_OFFLINE=1",
    )


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> str | None:
    override = netlimits.CACHE_DIR.get()  # timm's cache_dir= (see netlimits.cache_dir_scope)
    if override is not None:
        return str(override)
    # huggingface_hub reads HF_HOME / HF_HUB_CACHE once at import; honour changes made after that.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_cache() -> Path:
    """The Hugging Face cache folder in use (:func:`cache_dir`, else huggingface_hub's default)."""
    from huggingface_hub import constants

    return Path(cache_dir() or constants.HF_HUB_CACHE)


def split_hub_id(hub_id: str) -> tuple[str, str | None]:
    """``owner/repo@revision`` -> ``("owner/repo", "revision")``."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def cached_file(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The file from huggingface_hub's cache (``try_to_load_from_cache``), or None; never touches the network."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir(), revision=revision)
    except HFValidationError:
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def reachable(timeout: float) -> bool:
    """One TCP connect to the endpoint's host (skipped, True, behind a proxy), remembered for 30 s."""
    url = endpoint()
    now = time.monotonic()
    if url in _reachable and now - _reachable[url][0] < 30:
        return _reachable[url][1]
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=min(timeout, 5.0)):
            ok = True
    except OSError:
        ok = False
    _reachable[url] = (now, ok)
    return ok


def fetch(
    repo: str,
    filename: str,
    revision: str | None = None,
    *,
    progress: bool = True,
    deadline: Deadline | None = None,
    missing_ok: bool = False,
) -> Path | None:
    """``filename`` of ``repo`` through huggingface_hub, within ``deadline``.

    Returns None if the repository lacks the file and ``missing_ok``. Raises :class:`OfflineError` (offline,
    or huggingface_hub imported offline, and not cached), :class:`HubUnreachableError` (no connection, not
    cached), :class:`DownloadError` (HTTP error, past the deadline, a full cache),
    :class:`CheckpointNotFoundError` (no such repository, revision or file), :class:`InvalidSourceError` or
    :class:`CacheNotWritableError`.
    """
    require()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .urlfetch import is_offline

    deadline = deadline or Deadline(netlimits.download_timeout())
    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    host = urllib.parse.urlparse(endpoint()).netloc
    # huggingface_hub imported offline refuses every request: only its cache can serve, as offline
    offline = is_offline() or imported_offline()
    if not offline and not reachable(deadline.left()):
        cached = cached_file(repo, filename, revision)
        problem = damage(cached, filename, where) if cached is not None else None
        if cached is not None and problem is None:
            return cached
        state = "it is not cached" if cached is None else f"its cached copy {cached} is damaged ({problem})"
        raise HubUnreachableError(
            f"cannot connect to the Hub at {host} to fetch {filename} of {where}, and {state}. {FIXES}"
        )

    if not offline:
        clean_partials(repo)

    def download(force: bool = False) -> str:
        return hf_hub_download(
            repo_id=repo,
            filename=filename,
            revision=revision,
            cache_dir=cache_dir(),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=offline,
            etag_timeout=max(1.0, min(netlimits.read_timeout(), deadline.left())),
            force_download=force,
        )

    def call(force: bool = False) -> str:
        with _progress(progress):
            try:
                return download(force)
            except (*_transport_errors(), LocalEntryNotFoundError):
                if offline:  # a cache miss, not a cut: trying again finds nothing more
                    raise
                # A connection cut under the request, which huggingface_hub reports raw (httpx, 1.x) or as "not
                # cached, cannot reach the Hub" (requests, before): the endpoint answered reachable() just now.
                # huggingface_hub closes its shared HTTP client whenever a request in any thread fails to
                # connect (http_backoff -> close_session), cutting other threads' downloads (an abandoned,
                # still-retrying call of ours, say): one more try, on a fresh client. The failed try's partial
                # file is abandoned now (its lock released): remove it, or it stays in the cache for good.
                clean_partials(repo)
                return download(force)

    def timed_out() -> Exception:
        return DownloadError(
            f"fetching {filename} of {where} from {host} took longer than {deadline.seconds:g} s "
            f"(DEIT_REGISTRY_DOWNLOAD_TIMEOUT); the Hub is stalled or unreachable. {FIXES}"
        )

    def fetch_once(force: bool = False) -> Path | None:
        try:
            return Path(
                netlimits.run_with_deadline(lambda: call(force), max(0.0, deadline.left()), timed_out)
            )
        except WeightsError:
            raise
        except HFValidationError as e:
            raise InvalidSourceError(
                f"{where!r} is not a Hub id: expected the form 'hf-hub:owner/repo[@revision]', e.g. "
                f"'hf-hub:timm/deit_tiny_patch16_224.fb_in1k' ({e})"
            ) from e
        except LocalEntryNotFoundError as e:  # offline, or the Hub could not be reached, and not cached
            if offline:
                why, fix = offline_reason()
                raise OfflineError(
                    f"{why} and {filename} of {where} is not in the Hugging Face cache. {fix} to download it, or "
                    f"pass weights=PATH"
                ) from e
            raise DownloadError(
                f"could not reach the Hub at {host} for {filename} of {where}: {e}. {FIXES}"
            ) from e
        except EntryNotFoundError as e:
            if missing_ok:
                return None
            raise CheckpointNotFoundError(f"{where} has no file {filename}") from e
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise CheckpointNotFoundError(
                f"{where}: {type(e).__name__}: the repository or revision does not exist (or needs a token: "
                f"`hf auth login` or HF_TOKEN). Check the id, e.g. 'hf-hub:timm/deit_tiny_patch16_224.fb_in1k'"
            ) from e
        except (HfHubHTTPError, OSError, *_transport_errors()) as e:
            # huggingface_hub's cache writes fail raw: a read-only cache, a full disk (never retried)
            written = netlimits.cache_write_error(hub_cache(), e) if isinstance(e, OSError) else None
            if written is not None:
                clean_partials(repo)  # what the failed write left
                raise written from e
            raise DownloadError(
                f"fetching {filename} of {where} from {host} failed: {type(e).__name__}: {e}. {FIXES}"
            ) from e

    hit = cached_file(repo, filename, revision)
    path = fetch_once()
    problem = damage(path, filename, where) if path is not None else None
    if problem is None:
        return path
    if offline:  # nothing can replace it here: it stays, and the error says what is wrong
        why, fix = offline_reason()
        raise OfflineError(
            f"{why} and the cached {filename} of {where} ({path}) is damaged ({problem}). {fix} to download it "
            f"again, or pass weights=PATH"
        )
    if path == hit:  # a damaged hit: downloaded again, taking its place in one rename under huggingface_hub's
        # lock, so that a concurrent loader never finds it missing (removing it first would race them)
        warnings.warn(
            f"the cached {path} is not the file the Hub sent ({problem}); it was downloaded again from {host}",
            stacklevel=3,
        )
        path = fetch_once(force=True)
        problem = damage(path, filename, where) if path is not None else None
        if problem is None:
            return path
    evicted = _evict(path)  # what the Hub sent is bad: keep none of it
    removed = (
        "it was removed from the Hugging Face cache" if evicted is None else f"removing it failed ({evicted})"
    )
    raise DownloadError(
        f"{filename} of {where} from the Hub ({endpoint()}) is not the file it names: {problem}; {removed}. "
        f"Try again (online), or check HF_ENDPOINT"
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of huggingface_hub's HTTP client that escape it raw (a connection dropped or reset
    mid-response): ``TransportError`` of httpx (huggingface_hub 1.x) or httpx2 (2.x), whichever it has
    imported. requests' errors (before 1.x) are OSErrors already. huggingface_hub offers no base class of its
    own for them."""
    errors = (getattr(sys.modules.get(name), "TransportError", None) for name in ("httpx", "httpx2"))
    return tuple(e for e in errors if isinstance(e, type) and issubclass(e, Exception))


def damage(path: Path, filename: str, where: str) -> str | None:
    """Why the cached ``path`` is not the file the Hub sent, or None.

    huggingface_hub checks a file's size when it downloads it and nothing after. Its cache keeps each file as
    ``blobs/<etag>``, linked from the snapshot, and the etag of a weights (LFS) file is its sha256 (its
    documented layout; huggingface_hub compares the two itself for ``local_dir``), so a hit is checked against
    that name, as URL cache hits are against their records. Checked too: a whole checkpoint (not a truncated
    file or a mirror's HTML page), a JSON object for ``.json``.
    """
    from .urlfetch import sha256_of, validate_download

    try:
        if filename.endswith(".json"):
            try:
                parsed = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:  # an HTML page, a cut file
                return f"not a JSON object ({e})"
            if not isinstance(parsed, dict):
                return "not a JSON object"
        elif filename.endswith((".safetensors", ".bin", ".pth")):
            validate_download(path, filename, where)
    except Exception as e:  # _Transient (truncated), DownloadError (not a checkpoint), bad JSON
        return str(e)
    expected = _blob_sha256(path)
    if expected is not None and sha256_of(path) != expected:
        return f"its sha256 differs from {expected[:12]}..., the one huggingface_hub named its blob after"
    return None


def _blob_sha256(path: Path) -> str | None:
    """The sha256 that ``path``'s blob is named after; None where the snapshot holds a copy instead of a link
    (no symlinks, e.g. Windows: huggingface_hub warns itself) or the etag is no sha256 (a non-LFS file, a
    mirror's own etags). A link elsewhere than ``blobs/`` means the layout changed: warned, not checked."""
    if not path.is_symlink():
        return None
    # One link only: the blob may itself link on (huggingface_hub's shared store of Xet files)
    blob = Path(os.path.normpath(path.parent / os.readlink(path)))
    if blob.parent.name != "blobs":
        warnings.warn(
            f"{path} links to {blob}, not into the Hugging Face cache's blobs/ folder: its content is not checked "
            f"against the Hub's hash (deit_registry does not know this huggingface_hub cache layout)",
            stacklevel=4,
        )
        return None
    return blob.name if _SHA256.fullmatch(blob.name) else None


def _evict(path: Path) -> str | None:
    """Remove the cached revision holding ``path`` with huggingface_hub's public cache API (the Hub keeps a
    file per commit: a bad copy left there would fail every later load of that commit); the error, or None."""
    from huggingface_hub import scan_cache_dir

    try:
        scan_cache_dir(cache_dir()).delete_revisions(path.parent.name).execute()
    except Exception as e:  # the caller's error still names the file
        return f"{type(e).__name__}: {e}"
    return None


def clean_partials(repo: str) -> None:
    """Delete ``blobs/<etag>.<tag>.incomplete`` files of ``repo`` left by killed downloads.

    huggingface_hub writes each download to a process-unique ``.incomplete`` file under the lock
    ``.locks/<repo folder>/<etag>.lock`` and never removes one left by a killed process. No public API cleans
    them, so this one function relies on that documented cache layout: a partial is removed only if its lock
    can be taken at once (no live download holds it). Any surprise (another layout) skips with a warning.
    """
    from huggingface_hub.errors import HFValidationError

    try:
        from filelock import FileLock, Timeout
        from huggingface_hub.file_download import repo_folder_name

        root = hub_cache()
        folder = repo_folder_name(repo_id=repo, repo_type="model")
        for partial in (root / folder / "blobs").glob("*.incomplete"):
            lock = FileLock(str(root / ".locks" / folder / (partial.name.split(".")[0] + ".lock")), timeout=0)
            try:
                with lock:
                    partial.unlink(missing_ok=True)
            except Timeout:  # a live download holds it
                continue
    except HFValidationError:  # not a repository id: the download that follows says so
        return
    except Exception as e:  # never let housekeeping break a download
        import warnings

        warnings.warn(
            f"could not clean partial Hub downloads of {repo} ({type(e).__name__}: {e}); they stay in the "
            f"Hugging Face cache and can be deleted by hand (`hf cache` or the blobs/*.incomplete files)",
            stacklevel=3,
        )


class _progress:
    """Turn huggingface_hub's progress bars off for the call when ``enabled`` is False (its public switch)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.was_disabled = True

    def __enter__(self) -> None:
        if self.enabled:
            return
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self.was_disabled = are_progress_bars_disabled()
        disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        if not self.enabled and not self.was_disabled:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
