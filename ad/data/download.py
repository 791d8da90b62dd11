"""Fetch a dataset's public archive into ``dataset.root``: verified, extracted safely, all or nothing.

Only the standard library is used (urllib, hashlib, tarfile, zipfile): it covers http(s) and file://
URLs, every archive format the public datasets ship in, and tarfile's ``data`` filter; a download
library would add a dependency without removing any of the code below, which is about placing the
result atomically and safely rather than about fetching bytes.

The archive is streamed into a temporary folder beside the target while its SHA-256 is computed,
checked, extracted there, checked for the dataset's folders and renamed into place with one
``os.replace``: an interrupted download, a bad checksum, a tar cut short, missing categories or a
rejected member leave no partial dataset folder. A marker file inside the result
records the verified checksum, so a second call does nothing, and a file lock beside the target makes
concurrent sweep jobs download once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from ad.errors import ADError

log = logging.getLogger(__name__)

#: File written inside a downloaded dataset root; it holds the URL and the verified SHA-256.
MARKER = ".ad-download.json"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    """Where a dataset's public archive is and what it must hash to (``dataset.archive`` in config)."""

    url: str
    sha256: str
    folder: str | None = None  # folder inside the archive that becomes dataset.root; None = the archive's top level

    def __post_init__(self) -> None:
        if self.folder is not None and _escapes(self.folder):
            raise ADError(f"dataset.archive.folder: '{self.folder}' is not a folder inside the archive (absolute, or "
                          f"climbing out with ..); give its path relative to the archive's top level, or null")

    @classmethod
    def from_config(cls, node: Mapping | None) -> Archive:
        """Validate ``dataset.archive`` (url, sha256, folder) so a bad entry fails before any download."""
        node = dict(node or {})
        url, sha256, folder = node.get("url"), str(node.get("sha256") or "").lower(), node.get("folder")
        if not url or not isinstance(url, str):
            raise ADError("dataset.archive.url: not set; give the URL of the dataset's archive (http, https or file)")
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ADError(f"dataset.archive.sha256: {node.get('sha256')!r} is not a 64-digit hex SHA-256; set it")
        unknown = sorted(set(node) - {"url", "sha256", "folder"})
        if unknown:
            raise ADError(f"dataset.archive.{unknown[0]}: unknown setting; use url, sha256 and folder")
        return cls(url=url, sha256=sha256, folder=str(folder) if folder else None)


def download_dataset(root: Path, archive: Archive, present: Path, required: Sequence[str] = ()) -> None:
    """Make ``root`` hold the extracted archive, unless it already does; ``present`` is the path that shows it.

    Does nothing when ``root`` carries a marker with this archive's checksum or already holds
    ``present`` (data put there by hand). Refuses to write into a non-empty ``root`` that holds
    neither, so user files are never mixed with or replaced by a download. The extracted archive
    must hold ``present`` and files in each of the ``required`` folders (relative to ``root``)
    before it is put in place: a checksum only proves that the archive is the configured one.
    """
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.download.lock")):
        if _recorded_sha256(root) == archive.sha256 or present.exists():
            log.info("%s is already there; not downloading", present)
            return
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ADError(
                f"dataset.root: '{root}' exists and is not empty but has no '{present.name}'; point dataset.root "
                f"at an empty or absent folder to download into, or at a complete copy of the dataset"
            )
        _remove_stale_temp_folders(root)  # left by a killed download; safe, since we hold the lock
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.download-", dir=root.parent))
        try:
            _fetch(archive.url, staging / "archive", archive.sha256)
            extracted = staging / "extracted"
            extract(staging / "archive", extracted)
            source = extracted / archive.folder if archive.folder else extracted
            if not source.is_dir() or not source.resolve().is_relative_to(extracted.resolve()):
                found = ", ".join(sorted(p.name for p in extracted.iterdir())) or "nothing"
                raise ADError(
                    f"dataset.archive.folder: '{archive.folder}' is not in the archive (top level: {found}); fix it"
                )
            check_content(source, [*_relative(present, root), *required])
            (source / MARKER).write_text(json.dumps({"url": archive.url, "sha256": archive.sha256}) + "\n")
            if root.is_dir():
                root.rmdir()  # empty, checked above; os.replace cannot replace a directory on every platform
            os.replace(source, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("downloaded %s into %s", archive.url, root)


def _relative(path: Path, root: Path) -> list[str]:
    """``path`` relative to ``root`` as the one entry of a list, or no entry when it is not under ``root``."""
    try:
        return [Path(path).absolute().relative_to(root).as_posix()]
    except ValueError:
        return []


def check_content(source: Path, required: Sequence[str]) -> None:
    """ADError unless each ``required`` path exists under ``source``, a folder holding at least one file.

    Catches what a matching checksum cannot: an archive that is complete but is not this dataset,
    a ``dataset.archive.folder`` one level off, or a list of categories the archive does not have.
    """
    missing = [name for name in required if not _has_files(source / name)]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        raise ADError(f"dataset.archive: the extracted archive has no '{missing[0]}'{more}; it is incomplete or "
                      f"not this dataset: check dataset.archive.url, .sha256, .folder and dataset.categories")


def _has_files(path: Path) -> bool:
    """Whether ``path`` is a file, or a folder with a file somewhere inside."""
    return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))


def _recorded_sha256(root: Path) -> str | None:
    """The checksum recorded by a finished download into ``root``, if any."""
    try:
        return json.loads((root / MARKER).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_stale_temp_folders(root: Path) -> None:
    """Delete temp folders of earlier downloads into ``root`` that were killed before cleaning up."""
    for stale in root.parent.glob(f".{root.name}.download-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _fetch(url: str, destination: Path, sha256: str) -> None:
    """Stream ``url`` to ``destination`` with a progress bar, checking length and SHA-256 as it arrives."""
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, destination.open("wb") as file:  # noqa: S310
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            name = posixpath.basename(urllib.request.urlparse(url).path) or url
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise ADError(f"dataset.archive.url: downloading {url} failed ({reason}); check the URL and the network, "
                      f"or download it by hand and point dataset.root at the extracted folder") from error
    if expected is not None and received != expected:
        raise ADError(f"dataset.archive.url: download of {url} was cut off after {received} of {expected} bytes; "
                      f"run again to retry")
    if digest.hexdigest() != sha256:
        raise ADError(f"dataset.archive.sha256: {url} has SHA-256 {digest.hexdigest()}, expected {sha256}; the "
                      f"download is corrupt or the archive changed upstream: retry, or check and update the checksum")


def extract(archive: Path, destination: Path) -> None:
    """Extract a zip or tar (any compression) archive into ``destination``, rejecting unsafe members.

    Every member name and link target is checked first, so nothing is written when one would land
    outside ``destination``; tarfile's ``data`` filter (Python >= 3.10.12) is applied on top.
    """
    destination.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                _check_member_path(name)
            bundle.extractall(destination)
        return
    try:
        with tarfile.open(archive, tarinfo=_EndMarkingTarInfo) as bundle:
            members = bundle.getmembers()
            if not getattr(bundle, _END_SEEN, False):
                raise ADError(f"dataset.archive: the tar archive stops after {len(members)} members without tar's "
                              f"end-of-archive blocks: it was cut short or has junk at the end; download it again "
                              f"and check dataset.archive.url and .sha256")
            for member in members:
                _check_tar_member(member)
            if hasattr(tarfile, "data_filter"):
                bundle.extractall(destination, members=members, filter="data")
            else:  # members were all checked above
                bundle.extractall(destination, members=members)  # noqa: S202
    except tarfile.FilterError as error:
        raise ADError(f"dataset.archive: unsafe member in the archive ({error}); refusing to extract it") from error
    except (tarfile.TarError, EOFError) as error:
        message = f"dataset.archive: cannot read the archive as zip or tar ({error}); check dataset.archive.url"
        raise ADError(message) from error


_END_SEEN = "ad_end_of_archive_seen"


class _EndMarkingTarInfo(tarfile.TarInfo):
    """A TarInfo that notes on its TarFile when reading stopped at the end-of-archive blocks.

    tarfile ends the member list quietly at those zero blocks, but also at the end of the file, at
    a partial header and at a damaged one: a plain tar cut exactly at a member boundary read as a
    shorter, complete archive (and its checksum matches when the cut file is what was published).
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # a block of zeros: the end-of-archive marker
            setattr(tarfile_, _END_SEEN, True)
            raise


def _escapes(name: str) -> bool:
    """Whether an archive path is absolute or climbs out of the extraction folder."""
    normal = posixpath.normpath(name.replace("\\", "/"))
    return normal.startswith("/") or normal == ".." or normal.startswith("../") or (len(name) > 1 and name[1] == ":")


def _check_member_path(name: str) -> None:
    """ADError for a member that would be written outside the extraction folder."""
    if _escapes(name):
        raise ADError(f"dataset.archive: member '{name}' would be written outside the dataset folder; refusing "
                      f"to extract the archive")


def _check_tar_member(member: tarfile.TarInfo) -> None:
    """Reject tar members that escape the folder by name or by link target, and device files."""
    _check_member_path(member.name)
    if member.issym() or member.islnk():
        # a symlink's target is relative to its own folder, a hard link's to the archive's top level
        base = posixpath.dirname(member.name) if member.issym() else ""
        if member.linkname.startswith("/") or _escapes(posixpath.join(base, member.linkname)):
            raise ADError(f"dataset.archive: member '{member.name}' links to '{member.linkname}', outside the "
                          f"dataset folder; refusing to extract the archive")
    elif not (member.isfile() or member.isdir()):
        raise ADError(f"dataset.archive: member '{member.name}' is a device or pipe; refusing to extract the archive")
