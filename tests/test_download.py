"""Downloads over a real loopback HTTP server: checksum, retries, resume, cache; safe extraction."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest

from kseg.data.download import (
    ChecksumError,
    DownloadError,
    obtain_archive,
    safe_extract,
    sha256_file,
)
from tests.http_helpers import serve

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, several read chunks


@pytest.fixture
def site(tmp_path: Path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "a.zip").write_bytes(PAYLOAD)
    with serve(root) as server:
        yield server


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_caches(site, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KSEG_CACHE", str(tmp_path / "cache"))
    path = obtain_archive(f"{site.url}/a.zip", _sha(PAYLOAD), retries=0)
    assert path == tmp_path / "cache" / f"{_sha(PAYLOAD)}.zip"
    assert path.read_bytes() == PAYLOAD
    assert not list((tmp_path / "cache").glob("*.part"))
    # Second fetch: served from the cache, no request at all.
    again = obtain_archive(f"{site.url}/a.zip", _sha(PAYLOAD), retries=0)
    assert again == path and site.count("/a.zip") == 1
    # A damaged cache entry is detected and downloaded again.
    path.write_bytes(b"garbage")
    assert obtain_archive(f"{site.url}/a.zip", _sha(PAYLOAD), retries=0).read_bytes() == PAYLOAD
    assert site.count("/a.zip") == 2


def test_wrong_checksum_names_both_digests_and_keeps_nothing(site, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KSEG_CACHE", str(tmp_path / "cache"))
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        obtain_archive(f"{site.url}/a.zip", wrong, retries=0)
    assert wrong in str(err.value) and _sha(PAYLOAD) in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_two_503_then_success_retries(site, tmp_path: Path) -> None:
    from kseg.data.download import download

    site.fail["/a.zip"] = [503, 503]
    out = download(f"{site.url}/a.zip", tmp_path / "x.zip", sha256=_sha(PAYLOAD), retries=3,
                   backoff=0.01)  # fmt: skip
    assert out.read_bytes() == PAYLOAD
    assert site.count("/a.zip") == 3


def test_503_beyond_retries_fails(site, tmp_path: Path) -> None:
    from kseg.data.download import download

    site.fail["/a.zip"] = [503, 503, 503]
    with pytest.raises(DownloadError, match=r"after 3 attempts.*503"):
        download(f"{site.url}/a.zip", tmp_path / "x.zip", retries=2, backoff=0.01)
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.part").exists()


def test_404_is_not_retried(site, tmp_path: Path) -> None:
    from kseg.data.download import download

    with pytest.raises(DownloadError, match="404"):
        download(f"{site.url}/missing.zip", tmp_path / "x.zip", retries=3, backoff=0.01)
    assert site.count("/missing.zip") == 1


def test_cut_connection_resumes_with_range(site, tmp_path: Path) -> None:
    from kseg.data.download import download

    site.cut["/a.zip"] = 300_000
    out = download(f"{site.url}/a.zip", tmp_path / "x.zip", sha256=_sha(PAYLOAD), retries=2,
                   backoff=0.01)  # fmt: skip
    assert out.read_bytes() == PAYLOAD
    assert [r for p, r in site.requests if p == "/a.zip"] == [None, "bytes=300000-"]


def test_local_file_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(PAYLOAD)
    assert obtain_archive(str(path), _sha(PAYLOAD)) == path
    assert obtain_archive(path.as_uri(), _sha(PAYLOAD)) == path
    with pytest.raises(ChecksumError):
        obtain_archive(path.as_uri(), "1" * 64)
    with pytest.raises(FileNotFoundError, match="archive not found"):
        obtain_archive(str(tmp_path / "nope.zip"), None)


def _zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_safe_extract_skips_macos_metadata(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "ok.zip", {
        "root/a.txt": b"a", "root/sub/b.txt": b"b", "__MACOSX/root/._a.txt": b"x",
        "root/._a.txt": b"x", "root/.DS_Store": b"x",
    })  # fmt: skip
    out = tmp_path / "out"
    assert safe_extract(archive, out) == 2
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["root/a.txt", "root/sub/b.txt"]


@pytest.mark.parametrize(
    ("entries", "links"),
    [
        ({"ok.txt": b"1", "../evil.txt": b"x"}, None),
        ({"ok.txt": b"1", "a/../../evil.txt": b"x"}, None),
        ({"ok.txt": b"1", "/tmp/evil.txt": b"x"}, None),
        ({"ok.txt": b"1"}, {"link": "/etc/passwd"}),
    ],
)
def test_safe_extract_refuses_escapes_before_writing(tmp_path: Path, entries, links) -> None:
    archive = _zip(tmp_path / "bad.zip", entries, links)
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="unsafe archive entry"):
        safe_extract(archive, out)
    assert list(out.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "deep" / "evil.txt").exists()


def test_truncated_zip_is_a_clear_error(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "t.zip", {"a.bin": PAYLOAD})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(archive.read_bytes()[: len(PAYLOAD) // 2])
    with pytest.raises(ValueError, match="not a readable zip archive"):
        safe_extract(cut, tmp_path / "out")
    assert sha256_file(archive) == _sha(archive.read_bytes())
