"""A bounded on-disk cache shared by runs and sweep jobs: decoded images and backbone features.

Tensors are stored with ``torch.save``; plain arrays (decoded images) as ``.npy``, so that writing
and reading those needs numpy only (torch is imported on first tensor use).

Entries are content-addressed (the key hashes everything that determines the value), written to a
temporary file and renamed into place, so concurrent writers and interrupted runs can never leave a
half-written entry: a reader sees the whole file or none. Reads refresh an entry's modification
time; ``evict`` deletes the least recently used entries beyond the size bound. A folder that cannot be
written (full, read-only, not a folder) turns writing off for the rest of the run, with one warning:
the cache only saves time, so it never fails a run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

log = logging.getLogger(__name__)

#: Bump when the layout or meaning of cached values changes.
CACHE_VERSION = "1"
#: Temporary files older than this are leftovers of killed writers.
STALE_TMP_S = 3600
#: Held while a cache turns its writing off: the run's thread and the writer thread may fail at once.
_WRITES_OFF_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """``$AD_CACHE_DIR`` if set, else ``~/.cache/ad``."""
    return Path(os.environ.get("AD_CACHE_DIR") or "~/.cache/ad").expanduser()


def digest(*parts: bytes | memoryview | str) -> str:
    """Hex key over several byte strings (length-prefixed, so parts cannot run into each other).

    XXH3-128: a cache key needs no cryptographic strength, only that distinct inputs never collide
    by accident, and XXH3 hashes the hundreds of megabytes of pixels a run keys on at memory speed
    (about 10 GB/s against SHA-256's 1.5 GB/s even with the x86 SHA extensions). Buffers are hashed
    without a copy.
    """
    h = xxhash.xxh3_128()
    for part in parts:
        data = memoryview(part.encode() if isinstance(part, str) else part).cast("B")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _torch_save(value, file) -> None:
    """``torch.save`` in the plain pickle format: 4x faster to write than the zip format for the
    multi-megabyte feature entries (measured), and read back by ``torch.load(weights_only=True)`` alike.
    """
    import torch

    try:
        torch.save(value, file, _use_new_zipfile_serialization=False)
    except TypeError:  # a torch without the legacy writer
        torch.save(value, file)


def _disk_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None: torch's storage writer reports a full disk as a
    RuntimeError ("write(): fd N failed with No space left on device") with no OSError attached."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, RuntimeError) and os.strerror(errno.ENOSPC) in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


class DiskCache:
    """Tensors (or dicts/lists of tensors) and numpy arrays, stored one file per key under ``root/<kind>/``."""

    def __init__(self, root: str | Path | None = None, max_gb: float = 20.0) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.max_bytes = int(max_gb * 1024**3)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._in_flight: dict[tuple[str, str], object] = {}  # queued values, readable before they land
        self.writes_off = False  # set, with one warning, when the folder cannot be written

    def check_writable(self) -> bool:
        """Whether entries can be written under ``root`` (creating it); if not, writing is turned off now.

        The run calls it before its DataLoader workers start, so they inherit the answer and the
        warning is given once.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            self._turn_writes_off(exc)
        return not self.writes_off

    def _turn_writes_off(self, exc: OSError) -> None:
        """Stop writing for the rest of the run (entries already stored are still read); warn once."""
        with _WRITES_OFF_LOCK:
            was_off, self.writes_off = self.writes_off, True
        if not was_off:
            log.warning(
                "feature cache: cannot write to %s (%s); the run goes on without storing to it",
                self.root,
                exc.strerror or exc,
            )

    def save_async(self, kind: str, key: str, value) -> None:
        """Like ``save``, on a background thread; ``load`` returns the value meanwhile. The thread runs
        at the caller's priority: ``flush`` waits for it."""
        if self.writes_off:
            return
        self._in_flight[(kind, key)] = value
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ad-cache")

        def write() -> None:
            self.save(kind, key, value)
            self._in_flight.pop((kind, key), None)

        self._pending.append(self._writer.submit(write))

    def flush(self) -> None:
        """Wait for background writes to finish (they are atomic, so an abandoned one leaves nothing)."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    def _path(self, kind: str, key: str, suffix: str = ".pt") -> Path:
        return self.root / f"{kind}-v{CACHE_VERSION}" / key[:2] / f"{key}{suffix}"

    def contains_array(self, kind: str, key: str) -> bool:
        """Whether an array entry is stored, without reading it."""
        return self._path(kind, key, ".npy").is_file()

    def load_array(self, kind: str, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable (a damaged entry is removed)."""
        return self._read(self._path(kind, key, ".npy"), lambda path: np.load(path, allow_pickle=False))

    def save_array(self, kind: str, key: str, array: np.ndarray) -> None:
        """Write an array entry atomically (see ``save``)."""
        self._write(self._path(kind, key, ".npy"), lambda tmp: np.save(tmp, array, allow_pickle=False))

    def load(self, kind: str, key: str):
        """The cached value, or None when absent or unreadable (a damaged entry is removed)."""
        if (queued := self._in_flight.get((kind, key))) is not None:
            return queued
        import torch  # not at the top: decoding images into the cache needs no torch

        return self._read(self._path(kind, key), lambda path: torch.load(path, map_location="cpu", weights_only=True))

    @staticmethod
    def _read(path: Path, read):
        """``read(path)``, or None when the entry is absent or unreadable (then it is removed)."""
        try:
            value = read(path)
        except (FileNotFoundError, NotADirectoryError, PermissionError):  # absent, or a folder it cannot read
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, never an error
            log.warning("dropping unreadable cache entry %s (%s)", path, exc)
            with contextlib.suppress(OSError):  # a read-only folder keeps it; it stays a miss
                path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # mark as recently used for eviction
        except OSError:
            pass
        return value

    def save(self, kind: str, key: str, value) -> None:
        """Write atomically: temp file in the same folder, then rename over the final name."""
        self._write(self._path(kind, key), lambda tmp: _torch_save(value, tmp))

    def _write(self, path: Path, write) -> None:
        """Run ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``.

        A full or read-only disk (any OSError) turns writing off for the rest of the run, not fails it.
        """
        if self.writes_off:
            return
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer, threads included
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                write(file)
            os.replace(tmp, path)
        except BaseException as exc:  # also interrupted (Ctrl-C, a stopped prefetcher): leave no temp file behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if (failure := _disk_failure(exc)) is None:
                raise
            self._turn_writes_off(failure)

    def evict(self) -> int:
        """Delete least recently used entries until the cache fits its bound; returns bytes freed."""
        self.flush()
        if self.writes_off or not self.root.is_dir():  # nothing was added; a read-only folder cannot shrink
            return 0
        now, entries, freed = time.time(), [], 0
        for path in self.root.glob("*-v*/*/*"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by a concurrent run
                continue
            if path.suffix == ".tmp":
                if now - stat.st_mtime > STALE_TMP_S:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError:  # e.g. made read-only meanwhile: eviction is best effort
                continue
            total -= size
            freed += size
        if freed:
            log.info("feature cache: evicted %.1f MB to stay under %.1f GB", freed / 1e6, self.max_bytes / 1024**3)
        return freed
