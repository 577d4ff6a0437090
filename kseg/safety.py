"""Guards against hostile inputs: names from datasets, huge images, secrets in URLs.

Every rule here backs one line of ``docs/security.md``. The module imports only the standard
library (it is used by fetch, prepare, predict, serving and the config writers alike).

- :func:`member_path`: a path named by a dataset (``index.csv``) must stay inside its folder.
- :func:`check_tile_id`: a tile id becomes a file name; only ``[A-Za-z0-9_.-]`` is accepted.
- :func:`check_pixels`: an image's declared size is checked before it is decoded.
- :func:`redact` / :func:`redact_text`: credentials and query strings never reach a file or log.
"""

from __future__ import annotations

import os
import re
import struct
import urllib.parse
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

#: Default pixel limit of ``kseg predict`` (``--max-pixels``, ``KSEG_MAX_PIXELS``): 100 MP, e.g.
#: 10000 x 10000; the decoded RGB image, the network's maps and the labels then need about 2.5 GB.
PREDICT_MAX_PIXELS = 100_000_000
#: Default pixel limit of the served model (``model_config`` ``max_pixels``, ``KSEG_MAX_PIXELS``):
#: 25 MP (5000 x 5000) per request image keeps one worker under ~700 MB and a few seconds.
SERVING_MAX_PIXELS = 25_000_000
#: Largest request image the server decodes at all, in (base64-decoded) bytes.
SERVING_MAX_BYTES = 64 * 2**20

_TILE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
#: ``scheme://user:password@host`` and ``?query`` / ``#fragment`` of URLs inside free text.
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"<>]+)")


class UnsafeInput(ValueError):
    """An input refused on purpose (it would escape its folder, exhaust memory or disk)."""


# --------------------------------------------------------------------------------------------------
# Names from datasets
# --------------------------------------------------------------------------------------------------


def member_path(root: Path, name: str, where: str) -> Path:
    """``root / name`` if ``name`` is a relative path that stays inside ``root``.

    Absolute paths, drive letters, ``..`` components and symbolic links that resolve outside
    ``root`` are refused, so a dataset cannot make kseg read (and later publish) any other file.

    Raises:
        UnsafeInput: naming ``where`` (e.g. ``data/index.csv line 3, column image``).
    """
    text = str(name or "").strip()
    if not text:
        raise UnsafeInput(f"{where}: empty path")
    posix, windows = PurePosixPath(text.replace("\\", "/")), PureWindowsPath(text)
    if posix.is_absolute() or windows.drive or windows.root or ".." in posix.parts:
        raise UnsafeInput(
            f"{where}: {text!r} is not a path inside the dataset folder (absolute paths and "
            "'..' are refused)"
        )
    path = Path(root) / posix
    resolved, base = path.resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise UnsafeInput(
            f"{where}: {text!r} resolves to {resolved}, outside the dataset folder "
            "(a symbolic link?); refused"
        )
    return path


def check_tile_id(tile_id: str, where: str) -> str:
    """Returns ``tile_id`` if it is safe as a file name (letters, digits, ``_ . -``; <= 200).

    Raises:
        UnsafeInput: naming ``where`` and the id.
    """
    if not isinstance(tile_id, str) or not _TILE_ID.fullmatch(tile_id):
        raise UnsafeInput(
            f"{where}: tile_id {tile_id!r} is not a safe file name (use 1-200 letters, digits, "
            "'_', '.', '-', not starting with '.' or '-')"
        )
    return tile_id


# --------------------------------------------------------------------------------------------------
# Image size before decoding
# --------------------------------------------------------------------------------------------------


def max_pixels_from_env(default: int) -> int:
    """``KSEG_MAX_PIXELS`` if set (a positive integer), else ``default``.

    Raises:
        ValueError: If the variable is set to something else.
    """
    raw = os.environ.get("KSEG_MAX_PIXELS", "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"KSEG_MAX_PIXELS={raw!r}: expected a positive integer")
    return value


def check_pixels(height: int, width: int, limit: int, where: str, hint: str = "") -> None:
    """Refuses an image of more than ``limit`` pixels before it is decoded.

    Raises:
        UnsafeInput: naming ``where``, the size and the limit.
    """
    if int(height) * int(width) > limit:
        raise UnsafeInput(
            f"{where}: {width} x {height} pixels ({height * width / 1e6:.0f} MP) is above the "
            f"limit of {limit:,} pixels{hint}"
        )


def image_size(source: Any) -> tuple[int, int] | None:
    """``(height, width)`` read from an image's header (file path or file object), or None.

    PNG, JPEG, BMP and TIFF headers are read without decoding the pixels; None when the format
    is not recognised (the decoder then reports it). For a TIFF this is its first page.
    """
    head = _peek(source, 24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(height), int(width)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile

        try:
            with tifffile.TiffFile(source) as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        except Exception:
            return None
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as img:
                width, height = img.size
        return int(height), int(width)
    except Image.DecompressionBombError as err:
        raise UnsafeInput(
            f"{source if isinstance(source, str | Path) else 'image'}: {err}"
        ) from err
    except Exception:
        return None
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def _peek(source: Any, n: int) -> bytes:
    if hasattr(source, "read"):
        pos = source.tell()
        data = source.read(n)
        source.seek(pos)
        return bytes(data)
    with open(source, "rb") as fh:
        return fh.read(n)


# --------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------


def redact(value: str) -> str:
    """A URL without its password/token, query string and fragment; other text unchanged.

    ``http://user:token@host/x?X-Amz-Signature=s`` -> ``http://***@host/x?***``. Paths and
    ``sqlite:///`` URIs are returned as they are.
    """
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return _redact_match_text(value)
    if not parts.scheme or ("@" not in parts.netloc and not parts.query and not parts.fragment):
        return value  # nothing secret (and urlunsplit would drop sqlite:///'s empty host)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    fragment = "***" if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_match_text(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        scheme, rest = match.group(1), match.group(2)
        netloc, sep, tail = rest.partition("/")
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        tail = re.sub(r"[?#].*", "?***", tail)
        return scheme + netloc + sep + tail

    return _URL.sub(one, text)


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (an error message, a log line) passed through :func:`redact`."""
    return _redact_match_text(str(text)) if "://" in str(text) else str(text)


def redact_tree(obj: Any) -> Any:
    """``obj`` (dicts, lists, strings) with every URL-like string redacted."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_tree(v) for v in obj)
    if isinstance(obj, str):
        return redact(obj)
    return obj
