"""Time limits, retry budget, the per-source file lock and the messages shared by every download.

Environment variables (read at call time, so tests and notebooks can change them):

* ``DEIT_REGISTRY_DOWNLOAD_TIMEOUT`` - overall seconds one source may take, retries included (default 60);
* ``DEIT_REGISTRY_READ_TIMEOUT`` - seconds a single socket read may wait (default 15, never above the overall);
* ``DEIT_REGISTRY_RETRIES`` - further attempts after a transient failure (dropped connection, HTTP 5xx,
  timeout, truncated body) of an http(s) URL (default 2).

For the Hugging Face Hub, huggingface_hub's own ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` apply per
request and the overall deadline above bounds the whole call.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import CacheNotWritableError, DownloadError, WeightsError

T = TypeVar("T")

DEFAULT_DOWNLOAD_TIMEOUT_S = 60.0
DEFAULT_READ_TIMEOUT_S = 15.0
DEFAULT_RETRIES = 2
FIXES = (
    "Use a mirror (HF_ENDPOINT for the Hub, DEIT_REGISTRY_URL_ROOT for the official files), copy the cache "
    "from a machine that has the weights and set HF_HUB_OFFLINE=1, or pass weights=PATH to a local file; "
    "DEIT_REGISTRY_DOWNLOAD_TIMEOUT raises the time limit"
)


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:  # nan would disable every deadline, inf overflows them
        raise ValueError(f"{name}={text!r} must be a positive, finite number of seconds")
    return value


def download_timeout() -> float:
    """Overall seconds for one source (``DEIT_REGISTRY_DOWNLOAD_TIMEOUT``, default 60)."""
    return _env_float("DEIT_REGISTRY_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT_S)


def read_timeout() -> float:
    """Seconds one socket read may wait (``DEIT_REGISTRY_READ_TIMEOUT``, default 15, capped by the overall)."""
    return min(_env_float("DEIT_REGISTRY_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S), download_timeout())


def retries() -> int:
    """Further attempts after a transient failure (``DEIT_REGISTRY_RETRIES``, default 2)."""
    text = os.environ.get("DEIT_REGISTRY_RETRIES", "").strip()
    if not text:
        return DEFAULT_RETRIES
    if not (text.isascii() and text.isdigit()):  # isdigit alone takes "²", which int() refuses
        raise ValueError(f"DEIT_REGISTRY_RETRIES={text!r} must be a whole number >= 0")
    return int(text)


class Deadline:
    """``Deadline(seconds)``: ``left()`` seconds remain; ``expired()`` once they are spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def run_with_deadline(fn: Callable[[], T], seconds: float, on_timeout: Callable[[], Exception]) -> T:
    """``fn()`` in a daemon thread; raise ``on_timeout()`` if it has not returned after ``seconds``.

    For library calls with no overall deadline of their own (huggingface_hub bounds each request but retries
    connection errors and HTTP 5xx with back-off, and a trickling body never times out). The thread is left to
    finish or fail on its own; it only writes into the library's own cache under the library's own lock.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    context = contextvars.copy_context()  # the caller's settings (e.g. a cache_dir= scope) hold in the thread
    worker = threading.Thread(target=context.run, args=(target,), name="deit-registry-download", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise on_timeout()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@contextlib.contextmanager
def file_lock(path: Path, deadline: Deadline, what: str) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (fcntl on POSIX, msvcrt on Windows) held while the block
    runs. Waiting is bounded: a holder is itself bounded by its deadline, so after twice ours we give up."""
    give_up = time.monotonic() + 2 * deadline.seconds + 5
    ensure_writable(path.parent)
    with writing_cache(path.parent):
        handle = open(path, "a+b")
    with handle:
        while not _try_lock(handle):
            if time.monotonic() > give_up:
                raise DownloadError(
                    f"{what}: another process has been downloading it for too long (it holds {path}). Wait for "
                    f"it or end it, then try again"
                )
            time.sleep(0.05)
        try:
            yield
        finally:
            _unlock(handle)


def _try_lock(handle) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(handle) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_writable(directory: Path) -> None:
    """Create ``directory``; a read-only cache raises :class:`CacheNotWritableError` naming it and the fix."""
    with writing_cache(directory):
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable", str(directory))


# A read-only file system (EROFS) raises a plain OSError, not a PermissionError; a full disk or quota is no
# network fault, and would fail again on every retry.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_CACHE_FIXES = (
    "TORCH_HOME (torch.hub's cache, official files and URLs), HF_HUB_CACHE or HF_HOME (the Hugging Face "
    "cache); or pass weights=PATH to a local file"
)


@contextlib.contextmanager
def writing_cache(directory: Path | str) -> Iterator[None]:
    """Writes into the cache ``directory`` inside the block: a read-only or full file system raises our error
    naming the folder and the fix (:func:`cache_write_error`); any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        error = cache_write_error(directory, e)
        if error is None:
            raise
        raise error from e


def cache_write_error(directory: Path | str, e: OSError) -> WeightsError | None:
    """Our error for ``e``, raised by a write into the cache ``directory``; None if it is not a cache fault."""
    if isinstance(e, WeightsError):
        return None
    if isinstance(e, PermissionError) or e.errno in _NOT_WRITABLE:
        return not_writable(directory, e)
    if e.errno in _NO_SPACE:
        return DownloadError(
            f"the weights cache {directory} has no space left ({e}); nothing was cached. Free space there, or "
            f"point the cache at a folder with room: {_CACHE_FIXES}"
        )
    return None


def not_writable(directory: Path | str, e: BaseException) -> CacheNotWritableError:
    return CacheNotWritableError(
        f"the weights cache {directory} is not writable ({e}). Point the cache at a writable folder: "
        f"{_CACHE_FIXES}"
    )


# timm's ``cache_dir=`` for the calls inside :func:`cache_dir_scope`: URL files go to ``<dir>/checkpoints``,
# Hub files to ``<dir>``. A context variable, so neither torch.hub's nor the process's settings change and
# concurrent calls keep their own.
CACHE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "deit_registry_cache_dir", default=None
)


@contextlib.contextmanager
def cache_dir_scope(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Downloads inside the block use ``path`` as their cache root (``None``: the usual caches)."""
    token = CACHE_DIR.set(None if path is None else Path(path).expanduser())
    try:
        yield
    finally:
        CACHE_DIR.reset(token)
