"""What every dataset provides: a list of samples per split, their decoding, and a fingerprint.

Dataset classes only find files and build :class:`Sample` lists; decoding and resizing happen here,
identically for all of them, and torch views over the samples in :mod:`ad.data.tensors`. This module
does not import torch, so a side process can decode a dataset into the cache without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from ad.cache import DiskCache, digest
from ad.data.io import read_image, read_image_and_mask
from ad.errors import ADError, did_you_mean

if TYPE_CHECKING:
    from ad.data.tensors import ImageDataset

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    """One image of a split: where it is, whether it is anomalous, and where its ground-truth mask is."""

    image: Path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type (folder name)
    mask: Path | None = None  # ground-truth mask of an anomalous image; None for good ones or without masks


def check_image_size(image_size: object, key: str = "dataset.image_size") -> int:
    """Return ``image_size`` as an int, or raise ADError if it is not a positive integer."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ADError(f"{key}: must be a positive integer number of pixels, got {image_size!r}")
    return image_size


def check_category(category: str, categories: Sequence[str] | None, dataset: str) -> None:
    """ADError listing ``categories`` (``dataset.categories`` in config) when ``category`` is not one of them."""
    if categories is not None and category not in [str(name) for name in categories]:
        valid = ", ".join(str(name) for name in categories)
        raise ADError(f"dataset.category: '{category}' is not a category of {dataset}; "
                      f"{did_you_mean(category, categories)}valid: {valid}")


def sample_key(sample: Sample, image_size: int) -> str:
    """Cache key of a decoded sample: its files (path, size, mtime and the hash of their bytes) and the image size."""
    files = file_key(sample.image) + (f"|{file_key(sample.mask)}" if sample.mask else "")
    return digest("image", files, str(image_size))


#: XXH3-128 of file contents by (path, size, mtime, inode, ctime): each file is hashed once per process.
_content_hashes: dict[tuple[str, int, int, int, int], str] = {}


def file_key(path: Path) -> str:
    """Path, size, mtime and the XXH3-128 of a file's bytes: a key that changes whenever its content does.

    Size and mtime alone miss a file replaced by another of the same size with the same mtime
    (fixed-size BMP/TIFF, ``cp -p``, sync tools), which then served the old file's pixels. Hashing
    the bytes takes about 0.2 ms per MB from the page cache (0.3 ms for a 1.6 MB 900 px PNG that
    takes 33 ms to decode), once per process: it is remembered under the file's inode and ctime as
    well, which any rewrite or replacement changes.
    """
    stat = _stat(path)
    signature = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    content = _content_hashes.get(signature)
    if content is None:
        try:
            content = xxhash.xxh3_128_hexdigest(path.read_bytes())
        except OSError as error:
            raise _unreadable(path, error) from error
        _content_hashes[signature] = content
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{content}"


def decode(sample: Sample, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read, convert and resize one sample: uint8 (S, S, 3) image and uint8 (S, S) 0/1 mask."""
    if sample.mask is None:
        return read_image(sample.image, image_size), np.zeros((image_size, image_size), dtype=np.uint8)
    image, defect = read_image_and_mask(sample.image, sample.mask, image_size)
    return image, defect.astype(np.uint8)


#: Cache kind of decoded samples: the image's (S, S, 3) bytes followed by the mask's (S, S), as one
#: flat uint8 array. One small file (read back in ~0.1 ms), and both parts come back as contiguous
#: views, so a batch of them stacks with a plain copy (slicing an interleaved (S, S, 4) array did not).
#: The last ``CHECKSUM_BYTES`` are the XXH3-128 of the rest: an entry damaged in place (disk, a stray
#: write) still parses as an array, and is caught by it (~20 us for a 256 px entry).
DECODED = "decoded"
CHECKSUM_BYTES = 16


def load_decoded(sample: Sample, image_size: int, cache: DiskCache | None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded sample, from the cache when its files are unchanged (PNG decoding costs ~20 ms/image)."""
    if cache is not None and (found := cached_decoded(sample, image_size, cache)) is not None:
        return found
    return decode_into(cache, sample, image_size)


def cached_decoded(sample: Sample, image_size: int, cache: DiskCache) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached image and mask of ``sample``, or None when they are not cached or fail their checksum."""
    flat = cache.load_array(DECODED, sample_key(sample, image_size))
    pixels, mask = image_size * image_size * 3, image_size * image_size
    if flat is None or flat.shape != (pixels + mask + CHECKSUM_BYTES,):
        return None
    if xxhash.xxh3_128_digest(flat[:-CHECKSUM_BYTES]) != flat[-CHECKSUM_BYTES:].tobytes():
        log.warning("decoded-image cache entry of %s fails its checksum; decoding the file again", sample.image)
        return None  # the caller decodes it and overwrites the entry
    image, defect = flat[:pixels], flat[pixels : pixels + mask]
    return image.reshape(image_size, image_size, 3), defect.reshape(image_size, image_size)


def decode_into(cache: DiskCache | None, sample: Sample, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``sample`` and, with a cache, store it there; returns the image and mask."""
    image, mask = decode(sample, image_size)
    if cache is not None:
        _store(cache, sample_key(sample, image_size), image, mask)
    return image, mask


def warm(sample: Sample, image_size: int, cache: DiskCache) -> bool:
    """Decode ``sample`` into the cache unless it is there already (not read back); True if it decoded."""
    if cache.contains_array(DECODED, sample_key(sample, image_size)):
        return False
    decode_into(cache, sample, image_size)
    return True


def _store(cache: DiskCache, key: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Cache a decoded sample as one flat array: image bytes, mask bytes, then their checksum (see ``DECODED``)."""
    payload = np.concatenate([image.reshape(-1), mask.reshape(-1)])
    checksum = np.frombuffer(xxhash.xxh3_128_digest(payload), dtype=np.uint8)
    cache.save_array(DECODED, key, np.concatenate([payload, checksum]))


def seeded_split(items: Sequence, ratio: float, seed: int, key: str) -> tuple[list, list]:
    """Split ``items`` (paths or samples) into (kept, held out), holding out ``ratio`` of them; same seed, same split.

    Items are ranked by a hash of the seed and their file name, so the split does not depend on listing
    order or library versions, and adding images leaves earlier assignments mostly unchanged. At least
    one item is held out when ``ratio`` > 0, and at least one kept; ``key`` names the setting in errors.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ADError(f"{key}: must be a number in [0, 1), got {ratio!r}")
    n_held = round(len(items) * ratio)
    if ratio > 0 and n_held == 0:
        n_held = 1
    if n_held and n_held >= len(items):
        raise ADError(f"{key}: holding out {ratio} of {len(items)} good images leaves none to train on; "
                      f"add good images or lower {key}")
    name = lambda item: (item.image if isinstance(item, Sample) else item).name  # noqa: E731
    ranked = sorted(items, key=lambda item: hashlib.sha256(f"{seed}|{name(item)}".encode()).hexdigest())
    held = {id(item) for item in ranked[:n_held]}
    return [item for item in items if id(item) not in held], [item for item in items if id(item) in held]


class AnomalyDataset:
    """A category of an anomaly detection dataset: good training images, a validation split and a labelled test split.

    Subclasses find the files and call ``__init__`` with the sample lists; everything else is shared.
    The validation split, which operating thresholds are set on (never on the test split), is a seeded
    share ``val_ratio`` of the good training images unless a subclass lists its own (``val``).
    """

    name: str = "dataset"

    def __init__(
        self, category: str, image_size: int, train: list[Sample], test: list[Sample], has_masks: bool,
        val_ratio: float = 0.0, seed: int = 0, val: list[Sample] | None = None,
    ) -> None:
        self.category = category
        self.image_size = check_image_size(image_size)
        if val is None:
            train, val = seeded_split(train, val_ratio, seed, "dataset.val_ratio")
        self.train = train
        self.val = val
        self.test = test
        self.has_masks = has_masks

    @property
    def defects(self) -> list[str]:
        """Sorted defect types present in the test split."""
        return sorted({sample.defect for sample in self.test if sample.label == 1})

    def train_set(self, cache: DiskCache | None = None) -> ImageDataset:
        """Torch dataset of the (good-only) training images; ``cache`` keeps decoded images across runs."""
        from ad.data.tensors import ImageDataset  # torch: only where tensors are wanted

        return ImageDataset(self.train, self.image_size, cache)

    def val_set(self, cache: DiskCache | None = None) -> ImageDataset:
        """Torch dataset of the validation images (held-out good ones, and labelled defects where listed)."""
        from ad.data.tensors import ImageDataset

        return ImageDataset(self.val, self.image_size, cache)

    def test_set(self, cache: DiskCache | None = None) -> ImageDataset:
        """Torch dataset of the labelled test images, with masks where the dataset has them."""
        from ad.data.tensors import ImageDataset

        return ImageDataset(self.test, self.image_size, cache)

    def fingerprint(self) -> str:
        """Stable hash of class, category, image size and every file's key (see ``file_key``).

        Equal fingerprints mean the same pixels go in, so caches of features may be reused.
        """
        digest = hashlib.sha256(f"{type(self).__qualname__}|{self.category}|{self.image_size}".encode())
        for split, samples in (("train", self.train), ("val", self.val), ("test", self.test)):
            for sample in samples:
                digest.update(f"|{split}|{sample.label}|{file_key(sample.image)}".encode())
                if sample.mask is not None:
                    digest.update(f"|mask|{file_key(sample.mask)}".encode())
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        """One line describing the dataset, for logs."""
        anomalous = sum(sample.label for sample in self.test)
        masks = "with masks" if self.has_masks else "no masks: pixel metrics skipped"
        return (
            f"{self.name}/{self.category} at {self.image_size}px: {len(self.train)} train, {len(self.val)} val, "
            f"{len(self.test)} test ({anomalous} anomalous, defects: {', '.join(self.defects) or 'none'}), {masks}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"


def _stat(path: Path) -> os.stat_result:
    """``path.stat()``, or the ADError naming a dataset file that is gone or unreadable."""
    try:
        return path.stat()
    except OSError as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: OSError) -> ADError:
    return ADError(f"{path}: cannot read file ({error.strerror}); restore it or rebuild the dataset")
