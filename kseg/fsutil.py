"""Atomic file and folder writes: an interrupted write never leaves a half-written artifact.

Rules (docs/security.md):

- a file appears under its final name only complete (temporary sibling, fsync, rename); a failed
  write (disk full, ``ulimit -f``) raises an ``OSError`` that names the file and the cause;
- a folder stage output is built in a staging folder and swapped in whole. kseg replaces only
  folders it wrote itself: they carry the marker file :data:`MARKER`. A non-empty folder without
  it (say ``train.out_dir: .`` or a folder of the user's own files) is refused, never deleted;
- staging folders left by a killed stage (``.<name>.staging.<pid>.*``) are removed by the next run;
- files and folders get the permissions of the umask (``mkstemp`` alone would give 0600 / 0700,
  unreadable for the group of a shared checkout).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Marker file of a folder written by kseg (content fixed, so DVC hashes stay reproducible).
MARKER = ".kseg-output"
MARKER_TEXT = "written by kseg: the next run of its stage replaces this whole folder\n"
#: Files that identify a folder written by a kseg version before the marker existed.
LEGACY_MARKERS = (
    "fetch_params.json",
    "prepare_params.json",
    "stain.json",
    "train_summary.json",
    "normalize_params.json",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~_umask())


def write_failure(path: Path | str, err: BaseException) -> str:
    """A message for a failed write that names ``path`` and the likely cause (disk full...)."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or "requested and" in text or "No space" in text:
        cause = "the disk is full"
    elif code == errno.EFBIG or "File too large" in text:
        cause = "the file size limit was reached (ulimit -f)"
    else:
        cause = text
    try:
        free = shutil.disk_usage(Path(path).parent if Path(path).suffix else path).free
        room = f"; {free / 2**20:.0f} MiB free there"
    except OSError:
        room = ""
    message = f"cannot write {path}: {cause}{room}"
    return message + (f" ({text})" if cause != text else "")


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Raises:
        OSError: naming ``path`` and the cause (disk full, file size limit); ``path`` keeps its
            previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _chmod(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not str(err).startswith("cannot write"):
            raise OSError(getattr(err, "errno", None), write_failure(path, err)) from err
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling path to write to; renames it onto ``path`` on success.

    Use for writers that need a file name (PIL, torch.save, tifffile). On an exception the
    temporary file is removed and ``path`` keeps its previous content. Writers that report
    failure by a return value (``cv2.imwrite``) must raise themselves; an empty temporary file
    is never renamed into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.getsize(tmp) == 0:
            raise OSError(errno.EIO, f"cannot write {path}: the writer produced an empty file")
        _chmod(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not str(err).startswith("cannot write"):
            raise OSError(getattr(err, "errno", None), write_failure(path, err)) from err
        raise


def is_kseg_folder(folder: Path) -> bool:
    """True if ``folder`` is missing, empty, or was written by kseg (marker or legacy file)."""
    folder = Path(folder)
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    return not names or MARKER in names or any(n in names for n in LEGACY_MARKERS)


def check_replaceable(target: Path) -> None:
    """Raises ValueError unless kseg may replace ``target`` as a whole (see module docstring)."""
    target = Path(target)
    if str(target).strip() in ("", "."):
        raise ValueError("an output folder cannot be the working directory itself")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a folder; refusing to replace it")
    if not is_kseg_folder(target):
        some = sorted(p.name for p in target.iterdir())[:5]
        raise ValueError(
            f"{target}/ is not empty and was not written by kseg (no {MARKER} file; it holds "
            f"{some}); refusing to replace it: choose a new or empty folder, or remove it yourself"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> None:
    """Removes ``.<name>.staging.<pid>.*`` / ``.<name>.old.<pid>`` of processes that are gone."""
    for kind in ("staging", "old"):
        for path in Path(parent).glob(f".{name}.{kind}.*"):
            pid = path.name[len(f".{name}.{kind}.") :].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path, owned_only: bool = True) -> Iterator[Path]:
    """Yields an empty staging folder; on success it replaces ``target`` as a whole.

    The previous ``target`` is moved aside and deleted only after the new one is in place, so a
    failure at any point leaves either the old or the new folder, never a mix. The new folder
    carries :data:`MARKER`.

    Args:
        target: The output folder.
        owned_only: Refuse (ValueError) a non-empty ``target`` that kseg did not write.
    """
    target = Path(target)
    if owned_only:
        check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, target.name)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.staging.{os.getpid()}.", dir=target.parent)
    )
    _chmod(staging, 0o777)
    try:
        (staging / MARKER).write_text(MARKER_TEXT)
        _chmod(staging / MARKER, 0o666)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
