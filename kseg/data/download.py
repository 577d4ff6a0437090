"""Checksummed downloads with retries and a cache, and zip extraction that cannot escape its folder.

Only the standard library (``urllib``, ``zipfile``) and Rich (the progress bar) are used, so a fetch
works wherever kseg installs. The rules:

- A download streams into ``<dest>.part`` while its sha256 is computed, and is renamed onto ``dest``
  only when the checksum matches: a half-written or wrong file never carries the final name.
- Transient failures (connection reset or refused, timeouts, HTTP 5xx / 408 / 429, a body shorter
  than its ``Content-Length``) are retried with exponential backoff; an interrupted transfer resumes
  with an HTTP ``Range`` request when the server allows it. A 404 or 403 is final at once.
- Archives are kept in a cache keyed by sha256 (``$KSEG_CACHE``, default ``raw/`` in the working
  directory: the project's raw archives, tracked by DVC through ``data.dvc`` so that a team shares
  the exact bytes with ``dvc push`` / ``dvc pull``), so running ``kseg fetch`` again, or on a
  teammate's clone after ``dvc pull data.dvc``, does not download again.
- :func:`safe_extract` checks every entry before writing anything: absolute paths, ``..``
  components, links and entries that would resolve outside the target are refused; macOS metadata
  (``__MACOSX/``, ``._*``, ``.DS_Store``) is skipped.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import socket
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from kseg.safety import redact, redact_text

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB reads: progress updates often enough, few syscalls
#: HTTP statuses worth another try: the server or a proxy may be back in a moment.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Archive entries that are metadata of the archiving OS, not data.
_SKIP_PARTS = ("__MACOSX",)
_SKIP_NAMES = (".DS_Store", "Thumbs.db")


class DownloadError(OSError):
    """A download that failed for good (after retries, or a non-retryable error).

    ``transient`` says whether the last error was of a passing kind (5xx, reset, timeout): a
    later attempt may succeed, where a 404 or a refused URL will not.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ChecksumError(ValueError):
    """The downloaded or local file does not have the expected sha256."""


#: Default folder of verified archives (``<sha256>.zip``), relative to the working directory:
#: the project's ``raw/``, which ``data.dvc`` tracks.
RAW_DIR = Path("raw")


def cache_dir() -> Path:
    """Folder of verified archives: ``$KSEG_CACHE``, or ``raw/`` in the working directory."""
    return Path(os.environ.get("KSEG_CACHE") or RAW_DIR)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_remote(location: str) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return urllib.parse.urlsplit(location).scheme.lower() in ("http", "https")


def local_path(location: str) -> Path:
    """The path of a ``file://`` URL or of a plain path (``~`` expanded)."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(location).expanduser()


def verify_sha256(path: Path, expected: str) -> None:
    """Raises :class:`ChecksumError` naming both digests when ``path`` does not match."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual}. "
            + _mismatch_advice(expected, actual)
        )


def _mismatch_advice(expected: str, actual: str) -> str:
    """What to do about a checksum mismatch; never 'pin the new digest' for a known archive."""
    from kseg.data.sources import TNBC_SHA256

    if expected.lower() == TNBC_SHA256:
        return (
            "This is not the official TNBC archive: a corrupt or truncated copy, or another "
            "file. Download it again (delete the cached copy first); do not change data.sha256"
        )
    return (
        "The file is corrupt or truncated, or it is a different file. Download it again; only if "
        f"you have checked its origin and want exactly this file, set data.sha256: {actual}"
    )


def _transient(err: BaseException) -> bool:
    """Whether ``err`` is worth another attempt."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code in RETRY_STATUS
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        # DNS failures, refused and reset connections all land here; all may be momentary.
        return isinstance(reason, OSError | str)
    return isinstance(
        err, ConnectionError | TimeoutError | socket.timeout | http.client.HTTPException
    )


def _progress(total: int | None, label: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A Rich progress bar on a terminal; log lines otherwise. Returns (advance, close)."""
    if not sys.stderr.isatty():
        log.info("downloading %s (%s)", label, f"{total / 1e6:.1f} MB" if total else "size unknown")
        return (lambda n: None), (lambda: None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    bar.start()
    task = bar.add_task(label, total=total)
    return (lambda n: bar.advance(task, n)), bar.stop


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """One HTTP attempt appending to ``part`` (resuming it when the server honours Range)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "kseg-fetch/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        if offset and r.status != 206:
            offset = 0  # the server ignored Range and sends everything again: start over
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        advance, close = _progress(total, redact(url).rsplit("/", 1)[-1] or redact(url))
        advance(offset)
        written = offset
        try:
            with part.open("ab" if offset else "wb") as out:
                while chunk := r.read(CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    advance(len(chunk))
        finally:
            close()
        if total is not None and written < total:
            raise http.client.IncompleteRead(b"", total - written)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Downloads ``url`` to ``dest`` (via ``dest.part``), verifying ``sha256`` when given.

    Args:
        url: ``http(s)://`` URL.
        dest: Final file; written only when complete and verified.
        sha256: Expected hex digest, or None to accept any content.
        retries: Extra attempts after the first, for transient errors only.
        timeout: Socket timeout per attempt, in seconds.
        backoff: First wait between attempts in seconds; doubles each time.

    Raises:
        DownloadError: the server kept failing or answered with a final error (404, ...).
        ChecksumError: the complete download has another sha256 (the file is deleted).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)  # a stale .part of another run could belong to another file
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout)
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if not _transient(err) or attempt == retries:
                part.unlink(missing_ok=True)
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise DownloadError(
                    f"download of {redact(url)} failed{tries}: {redact_text(err)}",
                    transient=_transient(err),
                ) from err
            wait = backoff * 2**attempt
            log.warning(
                "download of %s failed (%s); retry %d/%d in %.1f s",
                redact(url),
                redact_text(err),
                attempt + 1,
                retries,
                wait,
            )
            time.sleep(wait)
    # Hashing the finished file (25 MB in ~0.05 s) keeps resumed transfers simple and exact.
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{redact(url)}: sha256 mismatch: expected {sha256.lower()}, got {actual}. "
            + _mismatch_advice(sha256, actual)
        )
    os.replace(part, dest)
    return dest


def obtain_archive(
    location: str, sha256: str | None, *, retries: int = 3, timeout: float = 60.0
) -> Path:
    """Returns a verified local copy of the archive at ``location`` (URL, file:// or path).

    Remote archives with a known checksum are cached as ``<cache>/<sha256>.zip``; a cached file is
    verified again before use (a damaged cache entry is downloaded anew). Local files are used in
    place, after the checksum check when one is given.
    """
    if not is_remote(location):
        path = local_path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: archive not found (from {location!r})")
        if sha256:
            verify_sha256(path, sha256)
        else:
            log.warning("%s: no sha256 given; the archive is not verified", path)
        return path
    cache = cache_dir()
    if sha256:
        cached = cache / f"{sha256.lower()}.zip"
        if cached.is_file():
            try:
                verify_sha256(cached, sha256)
                log.info("using cached archive %s", cached)
                return cached
            except ChecksumError:
                log.warning("cached archive %s is damaged; downloading again", cached)
                cached.unlink()
        return download(location, cached, sha256=sha256, retries=retries, timeout=timeout)
    log.warning(
        "%s: no sha256 given; the download is not verified and not cached", redact(location)
    )
    tmp = cache / "unverified" / f"{hashlib.sha256(location.encode()).hexdigest()[:16]}.zip"
    return download(location, tmp, sha256=None, retries=retries, timeout=timeout)


def _check_entry(info: zipfile.ZipInfo, target: Path) -> Path | None:
    """The destination of one entry, None to skip it, or ValueError when it is unsafe."""
    name = info.filename.replace("\\", "/")
    pure = PurePosixPath(name)
    if any(p in _SKIP_PARTS for p in pure.parts) or pure.name.startswith("._"):
        return None
    if pure.name in _SKIP_NAMES:
        return None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
        raise ValueError(f"unsafe archive entry {info.filename!r}: it would land outside {target}")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ValueError(f"unsafe archive entry {info.filename!r}: symbolic links are refused")
    dest = (target / pure).resolve()
    if not dest.is_relative_to(target.resolve()):
        raise ValueError(f"unsafe archive entry {info.filename!r}: it would land outside {target}")
    return dest


#: Default caps of :func:`safe_extract` (``data.max_extract_bytes``, ``data.max_entry_ratio``,
#: ``data.max_entries``). TNBC unpacks to 25 MB at a ratio of about 1 (PNGs are compressed).
MAX_EXTRACT_BYTES = 16 * 2**30
MAX_ENTRY_RATIO = 200.0
MAX_ENTRIES = 200_000
#: Entries smaller than this are exempt from the ratio cap (a blank mask compresses 1000x).
RATIO_FLOOR = 2**20


def check_archive_size(
    infos: list[zipfile.ZipInfo],
    archive: Path,
    max_bytes: int = MAX_EXTRACT_BYTES,
    max_ratio: float = MAX_ENTRY_RATIO,
    max_entries: int = MAX_ENTRIES,
) -> int:
    """Refuses a zip bomb from its directory alone; returns the bytes it will unpack to.

    Raises:
        ValueError: too many entries, too many bytes in all, or an entry expanding more than
            ``max_ratio`` times (each names the entry or the totals and the cap's parameter).
    """
    if len(infos) > max_entries:
        raise ValueError(
            f"{archive}: {len(infos)} entries, above data.max_entries={max_entries}; refused"
        )
    total = 0
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR and ratio > max_ratio:
            raise ValueError(
                f"{archive}: entry {info.filename!r} expands {ratio:.0f}x "
                f"({info.compress_size} -> {info.file_size} bytes), above "
                f"data.max_entry_ratio={max_ratio:g}; refused as a likely zip bomb"
            )
        total += info.file_size
    if total > max_bytes:
        raise ValueError(
            f"{archive}: unpacks to {total / 2**20:.0f} MiB, above data.max_extract_bytes="
            f"{max_bytes} ({max_bytes / 2**20:.0f} MiB); refused"
        )
    return total


def safe_extract(
    archive: Path,
    target: Path,
    *,
    max_bytes: int = MAX_EXTRACT_BYTES,
    max_ratio: float = MAX_ENTRY_RATIO,
    max_entries: int = MAX_ENTRIES,
    layout: Callable[[list[str]], None] | None = None,
) -> int:
    """Extracts a zip into ``target`` after checking every entry; returns the files written.

    Before one byte is written: every entry's path (no escape, no link), the caps on entries,
    total size and expansion ratio (:func:`check_archive_size`), the free disk space and, when
    given, ``layout(names)`` (raises ValueError when the archive is not the expected dataset).
    While writing, the bytes really produced are counted against the same cap.

    Raises:
        ValueError: for an unsafe entry, a cap exceeded, a wrong layout (nothing is written
            then) or a corrupt/truncated archive.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            plan = [(info, _check_entry(info, target)) for info in infos]
            kept = [info for info, dest in plan if dest is not None]
            total = check_archive_size(kept, Path(archive), max_bytes, max_ratio, max_entries)
            if layout is not None:
                layout([info.filename.replace("\\", "/") for info in kept])
            free = shutil.disk_usage(target).free
            if total > free:
                raise ValueError(
                    f"{archive}: unpacks to {total / 2**20:.0f} MiB but only "
                    f"{free / 2**20:.0f} MiB are free under {target}"
                )
            n, written = 0, 0
            for info, dest in plan:
                if dest is None:
                    continue
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, dest.open("wb") as out:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ValueError(
                                f"{archive}: more than data.max_extract_bytes={max_bytes} "
                                f"unpacked (entry {info.filename!r} lies about its size)"
                            )
                        out.write(chunk)
                n += 1
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error) as err:
        raise ValueError(
            f"{archive}: not a readable zip archive (truncated or corrupt?): {err}"
        ) from err
    return n
