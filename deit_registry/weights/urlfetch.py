"""http(s) downloads into torch.hub's cache: keyed by the whole URL, recorded, validated, bounded in time.

* Cache key: a file whose name carries its sha256 prefix (``<name>-<hex8>.pth``, the official files) keeps
  torch.hub's shared ``$TORCH_HOME/hub/checkpoints/<file>`` (timm and torchvision share it; the prefix is
  checked on every hit); any other URL gets its own folder ``checkpoints/<sha256(url)[:16]>/<file>``, so
  ``.../a/model.pth`` and ``.../b/model.pth`` (or ``?v=1`` and ``?v=2``) never collide.
* Record: beside each file, ``<file>.deit-registry.json`` holds its URL, size and sha256, written atomically
  before the file takes its name. A cache hit is checked against it (and against the 8-hex prefix of an
  official name); a hit that fails is deleted with a warning and downloaded again.
* Validation: a body is renamed into the cache only if it is a whole checkpoint of the expected kind (zip
  central directory present, safetensors header and size consistent, not an HTML page).
* Time: an overall deadline, a per-read socket timeout and a retry budget (:mod:`.netlimits`).

Why not ``torch.hub.download_url_to_file``: it has no socket timeout (a silent server hangs it forever), no
overall deadline, no Content-Length check and no hook to validate the body before its final rename; the
loop below adds exactly those and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path

from ..errors import (
    CorruptCheckpointError,
    DownloadError,
    HashMismatchError,
    InvalidSourceError,
    OfflineError,
    UnsafeCheckpointError,
    WeightsError,
)
from . import netlimits
from .netlimits import FIXES, Deadline

# torch.hub's convention, name-<sha256 prefix>.ext; with a letter a-f in it, since names often end in a step
# or a date (checkpoint-00000100.pth, deit-20240131.pth) that no download could match.
HASH_IN_NAME = re.compile(r"-((?=[0-9]*[a-f])[a-f0-9]{8,64})\.[A-Za-z0-9]+$")
RECORD_SUFFIX = ".deit-registry.json"
PARTIAL_INFIX = ".deit-"  # our partial files: <file>.deit-<random>.partial
# What the longest name made from a cached file's adds to it: a partial, <file>.deit-<8 random>.partial (mkstemp)
LONGEST_SUFFIX = len(PARTIAL_INFIX) + 8 + len(".partial")
NOT_CACHED = "it is not cached"  # _check_hit's answer when there is no file
STALE_FOREIGN_PARTIAL_S = 3600.0  # torch.hub's <file>.<uuid>.partial: only removed once surely abandoned
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class _Transient(Exception):
    """A failure worth another attempt (dropped connection, timeout, 5xx, truncated body)."""


def cache_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), the folder timm and torchvision use, or
    ``<dir>/checkpoints`` inside :func:`~deit_registry.weights.netlimits.cache_dir_scope` (timm's layout)."""
    override = netlimits.CACHE_DIR.get()
    if override is not None:
        return override / "checkpoints"
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def file_name(url: str) -> str:
    path = urllib.parse.urlparse(url).path
    name = path.rsplit("/", 1)[-1]  # not Path(path).name, which would call ".../folder/" "folder"
    if not name or name in (".", ".."):
        raise InvalidSourceError(
            f"the URL {url!r} names no file (its path ends in '/'). Give the URL of the weights file itself, "
            f"e.g. https://host/path/model.safetensors"
        )
    return name


def cache_path(url: str, shared: bool | None = None) -> Path:
    """Where ``url`` is cached: ``checkpoints/<file>`` if ``shared``, else a folder per URL. By default a name
    that carries its sha256 prefix (``name-<hex8>.pth``, the official files) is shared, as torch.hub and timm do:
    its content is pinned by the name and checked on download and on every hit."""
    name = file_name(url)
    if shared is None:
        shared = HASH_IN_NAME.search(name) is not None
    if shared:
        return cache_dir() / name
    return cache_dir() / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] / name


def fetch_url(
    url: str, hash_prefix: str | None = None, progress: bool = True, shared: bool | None = None
) -> Path:
    """The cached file of ``url``, downloaded once (locked, validated, recorded) if needed."""
    _check_url(url)
    dst = cache_path(url, shared)
    problem = _check_hit(dst, url, hash_prefix, repair=False)
    if problem is None:
        return dst
    if is_offline():
        # Only a name's hash vouches for a file copied into the cache by hand (_check_hit); others need a path.
        copy = f"copy it to {dst} or " if hash_prefix else ""
        if problem == NOT_CACHED:
            raise OfflineError(
                f"offline mode (HF_HUB_OFFLINE / DEIT_REGISTRY_OFFLINE) and {dst.name} is not cached in "
                f"{dst.parent}. Unset offline mode, or download it elsewhere from {url} and {copy}pass "
                f"weights=PATH"
            )
        replace = "copy a good copy over it or " if hash_prefix else ""
        raise OfflineError(
            f"offline mode (HF_HUB_OFFLINE / DEIT_REGISTRY_OFFLINE) and the cached {dst} is damaged ({problem}); "
            f"it was kept. Unset offline mode once to have it downloaded again from {url}, or {replace}pass "
            f"weights=PATH"
        )
    _check_name_length(dst, url)
    deadline = Deadline(netlimits.download_timeout())
    netlimits.ensure_writable(dst.parent)
    with netlimits.file_lock(dst.parent / (dst.name + ".lock"), deadline, f"downloading {url}"):
        # Under the lock no live process of ours is writing this source: a hit is final, a bad one ours to fix.
        if _check_hit(dst, url, hash_prefix, repair=True) is None:
            return dst
        clean_partials(dst)
        _download_with_retries(url, dst, hash_prefix, progress, deadline)
    return dst


def _check_url(url: str) -> None:
    """A URL urllib cannot even request (no scheme it knows, no host) is no network fault: never retried."""
    try:
        scheme, host = urllib.request.Request(url).type, urllib.parse.urlparse(url).hostname
    except ValueError as e:  # unknown url type, a malformed host
        raise InvalidSourceError(
            f"{url!r} is not a URL deit_registry can download ({e}). Give an http(s):// URL of the weights "
            f"file (check DEIT_REGISTRY_URL_ROOT), or pass weights=PATH to a local file"
        ) from e
    if scheme in ("http", "https") and not host:
        raise InvalidSourceError(f"the URL {url!r} names no host. Give the URL of the weights file itself")


def _check_name_length(dst: Path, url: str) -> None:
    """Refuse a file name too long to download into the cache with the suffixes of its partial, lock and
    record files (a raw ENAMETOOLONG otherwise); a hit placed by hand is still used."""
    folder = dst.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        name_max = 255
    if len(os.fsencode(dst.name)) + LONGEST_SUFFIX > name_max:
        raise InvalidSourceError(
            f"the file name of {url} is too long to cache: with the suffixes of its partial, lock and record "
            f"files it exceeds the {name_max}-byte limit on file names in {dst.parent}. Download it yourself "
            f"and pass weights=PATH, or serve it under a name of at most {name_max - LONGEST_SUFFIX} bytes"
        )


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``DEIT_REGISTRY_OFFLINE`` set to 1/true/yes/on (read at call time)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
        for v in ("HF_HUB_OFFLINE", "DEIT_REGISTRY_OFFLINE")
    )


# ------------------------------------------------------------------------------------------ cache records
def record_path(dst: Path) -> Path:
    return dst.with_name(dst.name + RECORD_SUFFIX)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_record(dst: Path) -> dict | None:
    try:
        record = json.loads(record_path(dst).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(dst: Path, url: str, size: int, sha256: str) -> None:
    data = json.dumps({"url": url, "size": size, "sha256": sha256, "stored": time.time()})
    with netlimits.writing_cache(dst.parent):
        fd, tmp = tempfile.mkstemp(prefix=dst.name + PARTIAL_INFIX, suffix=".partial", dir=dst.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, record_path(dst))
        finally:
            Path(tmp).unlink(missing_ok=True)


def _check_hit(dst: Path, url: str, hash_prefix: str | None, repair: bool) -> str | None:
    """None if ``dst`` holds what was recorded when it was stored, else why not (:data:`NOT_CACHED`: no file).
    With ``repair`` (under the lock) a file that fails is deleted with a warning, and an official file placed
    by torch.hub/timm gets its record."""
    if not dst.is_file():
        return NOT_CACHED
    record = _read_record(dst)
    size, digest = dst.stat().st_size, sha256_of(dst)
    if hash_prefix is not None and not digest.startswith(hash_prefix):
        problem = f"its sha256 does not start with {hash_prefix}, the prefix in its name"
    elif record is None:  # only a hash in the name vouches for an unrecorded file
        problem = None if hash_prefix is not None else f"it has no record ({record_path(dst).name})"
    elif record.get("size") != size or record.get("sha256") != digest:
        problem = "its size or sha256 differs from the record written when it was stored"
    else:
        problem = None
    if not repair:
        return problem
    if problem is None:
        if record is None:
            _write_record(dst, url, size, digest)
        return None
    warnings.warn(
        f"the cached {dst} is not the file that was downloaded ({problem}); it was deleted and will be "
        f"downloaded again from {url}",
        stacklevel=4,
    )
    with netlimits.writing_cache(dst.parent):
        dst.unlink(missing_ok=True)
        record_path(dst).unlink(missing_ok=True)
    return problem


def clean_partials(dst: Path) -> None:
    """Remove partial downloads of ``dst`` left by killed processes. Called under ``dst``'s lock, so ours are
    abandoned; torch.hub's own (``<file>.<uuid>.partial``, written without a lock) only once an hour old."""
    now = time.time()
    for p in dst.parent.glob(glob_escape(dst.name) + ".*.partial"):
        try:
            ours = p.name.startswith(dst.name + PARTIAL_INFIX)
            if ours or now - p.stat().st_mtime > STALE_FOREIGN_PARTIAL_S:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


# ---------------------------------------------------------------------------------------------- download
def _download_with_retries(
    url: str, dst: Path, hash_prefix: str | None, progress: bool, deadline: Deadline
) -> None:
    host = urllib.parse.urlparse(url).netloc
    budget = netlimits.retries()
    attempt = 0
    while True:
        attempt += 1
        try:
            _download_once(url, dst, hash_prefix, progress, deadline)
            return
        except _Transient as e:
            stalled = deadline.left() <= 0.2
            if stalled or attempt > budget:
                limit = (
                    f"no complete response within {deadline.seconds:g} s (DEIT_REGISTRY_DOWNLOAD_TIMEOUT)"
                    if stalled
                    else f"{attempt} attempts (DEIT_REGISTRY_RETRIES={budget})"
                )
                raise DownloadError(
                    f"downloading {dst.name} from {host} ({url}) failed after {limit}: {e}. Nothing was "
                    f"cached; try again later. {FIXES}"
                ) from e
            time.sleep(min(0.5 * attempt, max(0.0, deadline.left() - 0.2)))


def _download_once(url: str, dst: Path, hash_prefix: str | None, progress: bool, deadline: Deadline) -> None:
    # Writes into the cache (writing_cache) raise our errors and are never retried; network errors are sorted
    # out below, so that a firewall's EPERM, say, is not taken for an unwritable cache.
    with netlimits.writing_cache(dst.parent):
        fd, tmp_name = tempfile.mkstemp(prefix=dst.name + PARTIAL_INFIX, suffix=".partial", dir=dst.parent)
    tmp = Path(tmp_name)
    out = os.fdopen(fd, "wb")
    try:
        sha = hashlib.sha256()
        received, total = 0, None
        timeout = max(0.05, min(netlimits.read_timeout(), deadline.left()))
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "deit-registry"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isascii() and length.isdigit() else None
                bar = _progress_bar(total, dst.name) if progress else None
                try:
                    while True:
                        if deadline.expired():  # a trickling body never trips the per-read timeout
                            raise _Transient(
                                f"still receiving after {deadline.seconds:g} s ({received} bytes)"
                            )
                        # read1: at most one socket read, so the deadline is checked between reads (read(n)
                        # would wait for all n bytes).
                        chunk = response.read1(1 << 20)
                        if not chunk:
                            break
                        with netlimits.writing_cache(dst.parent):
                            out.write(chunk)
                        sha.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
            with netlimits.writing_cache(dst.parent):
                out.close()  # its last flush may find the disk full
        except WeightsError:  # a cache write that failed
            raise
        except urllib.error.HTTPError as e:
            if e.code in _RETRY_STATUS:
                raise _Transient(f"HTTP {e.code} {e.reason}") from e
            raise DownloadError(
                f"downloading {dst.name} from {url} failed: HTTP {e.code} {e.reason}. Check the URL (or "
                f"DEIT_REGISTRY_URL_ROOT) and try again, or download the file yourself and pass weights=PATH"
            ) from e
        except http.client.InvalidURL as e:  # e.g. a space in it: permanent
            raise InvalidSourceError(
                f"{url!r} is not a valid URL ({e}). Quote it (a space is %20), or check DEIT_REGISTRY_URL_ROOT"
            ) from e
        except http.client.IncompleteRead as e:  # a chunked body cut short
            raise _Transient(f"the connection dropped mid-body ({received} bytes received, {e!r})") from e
        except (http.client.HTTPException, urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                reason = (
                    f"no data for {timeout:g} s (DEIT_REGISTRY_READ_TIMEOUT); check the network connection"
                )
            else:
                reason = f"{reason or type(e).__name__}; check the network connection"
            raise _Transient(str(reason)) from e
        if total is not None and received != total:
            raise _Transient(f"the connection dropped after {received} of {total} bytes")
        digest = sha.hexdigest()
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise HashMismatchError(
                f"{dst.name} from {url}: sha256 {digest[: len(hash_prefix)]}... does not match the "
                f"{hash_prefix} in its name, so the download is corrupt or was tampered with; it was deleted. "
                f"Try again, or check the mirror set in DEIT_REGISTRY_URL_ROOT"
            )
        validate_download(tmp, dst.name, url)
        _write_record(
            dst, url, received, digest
        )  # the record first: a file under its name is always recorded
        with netlimits.writing_cache(dst.parent):
            os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):  # already failed: the error raised says why
            out.close()
        tmp.unlink(missing_ok=True)


def _progress_bar(total: int | None, name: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)


# --------------------------------------------------------------------------------------------- validation
def validate_download(file: Path, name: str, url: str) -> str:
    """The format of a downloaded ``file`` if it is a whole checkpoint; else ``_Transient`` (truncated) or
    :class:`DownloadError` (not a checkpoint at all, e.g. an HTML page served with HTTP 200)."""
    from . import formats

    try:
        fmt = formats.sniff_format(file)
    except CorruptCheckpointError:
        with open(file, "rb") as f:
            head = f.read(512)
        kind = "an HTML page" if b"<html" in head.lower() or head.lstrip()[:1] == b"<" else "not a checkpoint"
        raise DownloadError(
            f"{url} answered HTTP 200 with {kind} (first bytes {head[:16]!r}), not the weights file {name}; "
            f"a proxy, login or error page is likely. Nothing was cached. Check the URL; {FIXES}"
        ) from None
    if name.endswith(".safetensors") and fmt != "safetensors":
        raise DownloadError(f"{url} is named .safetensors but holds a {fmt} file; nothing was cached")
    size = file.stat().st_size
    if fmt == "torch-zip":
        try:
            with zipfile.ZipFile(file) as z:  # reads the central directory, which sits at the very end
                ends = [i.header_offset + i.compress_size for i in z.infolist()]
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise _Transient(f"it is a truncated torch file ({size} bytes: {e})") from e
        if ends and max(ends) > size:
            raise _Transient(f"it is a truncated torch file ({size} bytes)")
    elif fmt == "safetensors":
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(n))
                end = max(
                    (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0
                )
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise _Transient(f"it is a truncated safetensors file ({size} bytes: {e})") from e
        if 8 + n + end != size:
            raise _Transient(f"it is a truncated safetensors file ({size} of {8 + n + end} bytes)")
    else:  # legacy pickle: no index to check, so read it (weights_only; nothing in it runs)
        try:
            formats.read_checkpoint(file)
        except UnsafeCheckpointError:
            pass  # whole, but refused at load time with its own message
        except CorruptCheckpointError as e:
            raise _Transient(f"it is a truncated torch file ({size} bytes)") from e
    return fmt
