"""Downloading Broden from the Network Dissection project site: resumable, verified, unpacked."""

from __future__ import annotations

import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from n2vdb.data.writing import os_errors
from n2vdb.errors import DatasetError, UsageError
from n2vdb.progress import progress_bar

BASE_URL = "http://netdissect.csail.mit.edu/data"
RELEASES = ("broden1_224", "broden1_227", "broden1_384")


def url_for(release: str) -> str:
    if release not in RELEASES:
        raise UsageError(f"unknown Broden release {release!r}; choose one of {', '.join(RELEASES)}")
    return f"{BASE_URL}/{release}.zip"


def fetch(release: str, directory: Path, timeout: float = 15.0) -> Path:
    """Download RELEASE into DIRECTORY (resuming a partial .zip.part), check the archive, unpack it.
    Returns the dataset directory (DIRECTORY/RELEASE)."""
    url = url_for(release)
    target = directory / release
    if (target / "index.csv").exists():
        return target
    with os_errors("download Broden", directory):
        directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"{release}.zip"
    partial = directory / f"{release}.zip.part"
    if not archive.exists():
        _download(url, partial, timeout, directory, release)
        partial.rename(archive)
    try:
        with zipfile.ZipFile(archive) as zipped:
            bad = zipped.testzip()
            if bad:
                raise DatasetError(f"{archive} is corrupt ({bad} fails its CRC); delete it and fetch again")
            with os_errors("unpack Broden", directory):
                zipped.extractall(directory)
    except zipfile.BadZipFile:
        raise DatasetError(f"{archive} is not a zip archive; delete it and fetch again") from None
    if not (target / "index.csv").exists():
        raise DatasetError(f"{archive} unpacked without {release}/index.csv; is it a Broden archive?")
    return target


def _download(url: str, partial: Path, timeout: float, directory: Path, release: str) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetError(
            f"cannot download {url} ({reason}); download it by hand and unzip it into {directory} "
            f"(so that {directory / release / 'index.csv'} exists), then `n2vdb data add {directory / release} "
            f"--name {release}`"
        ) from None
    with response:
        resumed = response.status == 206
        total = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
        mode = "ab" if resumed else "wb"
        with partial.open(mode) as out, progress_bar() as bar:
            task = bar.add_task(f"downloading {release}", total=total or None, completed=have if resumed else 0)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.advance(task, len(chunk))
