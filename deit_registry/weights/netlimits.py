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
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import CacheNotWritableError, DownloadError

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
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive")
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
    if not text.isdigit():
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
    with open(path, "a+b") as handle:
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
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(13, "not writable", str(directory))
    except PermissionError as e:
        raise not_writable(directory, e) from e


def not_writable(directory: Path | str, e: BaseException) -> CacheNotWritableError:
    return CacheNotWritableError(
        f"the weights cache {directory} is not writable ({e}). Point the cache at a writable folder: "
        f"TORCH_HOME (torch.hub's cache, official files and URLs), HF_HUB_CACHE or HF_HOME (the Hugging Face "
        f"cache); or pass weights=PATH to a local file"
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
