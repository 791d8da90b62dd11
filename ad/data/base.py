"""What every dataset provides: a list of samples per split, torch Datasets over them, and a fingerprint.

Dataset classes only find files and build :class:`Sample` lists; decoding, resizing and normalising
happen here, identically for all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ad.cache import DiskCache, digest
from ad.data.io import read_image, read_image_and_mask
from ad.errors import ADError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_SCALE, _SHIFT = 1.0 / (255.0 * _STD), -_MEAN / _STD  # normalise uint8 in one multiply-add


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
        raise ADError(f"dataset.category: '{category}' is not a category of {dataset}; valid: {valid}")


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) image to an ImageNet-normalised float32 (3, H, W) tensor, as backbones expect."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return pixels.float().mul_(_SCALE).add_(_SHIFT)


def denormalize(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Undo :func:`normalize` for display: (B, 3, S, S) or (3, S, S) floats to uint8 (B, S, S, 3)."""
    pixels = torch.as_tensor(images).detach().float().cpu()
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    pixels = pixels * _STD + _MEAN
    return (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ImageDataset(Dataset):
    """Torch dataset over samples; items are dicts of ``image``, ``mask``, ``label`` and ``path``.

    ``image`` is float32 (3, S, S) ImageNet-normalised; ``mask`` uint8 (S, S) with 1 for defect pixels
    (all zeros for good images or when there are no masks); ``label`` an int64 scalar tensor.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, cache: DiskCache | None = None) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Read, convert and resize one sample: uint8 (S, S, 3) image and uint8 (S, S) 0/1 mask."""
        size = self.image_size
        if sample.mask is None:
            return read_image(sample.image, size), np.zeros((size, size), dtype=np.uint8)
        image, defect = read_image_and_mask(sample.image, sample.mask, size)
        return image, defect.astype(np.uint8)

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Decoded sample, from the cache when its files are unchanged (PNG decoding costs ~30 ms/image)."""
        if self.cache is None:
            return self.decode(sample)
        files = _file_signature(sample.image) + (f"|{_file_signature(sample.mask)}" if sample.mask else "")
        key = digest("image", files, str(self.image_size))
        if (cached := self.cache.load("images", key)) is not None:
            return cached["image"].numpy(), cached["mask"].numpy()
        image, mask = self.decode(sample)
        self.cache.save("images", key, {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)})
        return image, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index]
        image, mask = self.load(sample)
        return {
            "image": normalize(image),
            "mask": torch.from_numpy(mask),
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "path": str(sample.image),
        }


class AnomalyDataset:
    """A category of an anomaly detection dataset: good training images and a labelled test split.

    Subclasses find the files and call ``__init__`` with the sample lists; everything else is shared.
    """

    name: str = "dataset"

    def __init__(
        self, category: str, image_size: int, train: list[Sample], test: list[Sample], has_masks: bool
    ) -> None:
        self.category = category
        self.image_size = check_image_size(image_size)
        self.train = train
        self.test = test
        self.has_masks = has_masks

    @property
    def defects(self) -> list[str]:
        """Sorted defect types present in the test split."""
        return sorted({sample.defect for sample in self.test if sample.label == 1})

    def train_set(self, cache: DiskCache | None = None) -> ImageDataset:
        """Torch dataset of the (good-only) training images; ``cache`` keeps decoded images across runs."""
        return ImageDataset(self.train, self.image_size, cache)

    def test_set(self, cache: DiskCache | None = None) -> ImageDataset:
        """Torch dataset of the labelled test images, with masks where the dataset has them."""
        return ImageDataset(self.test, self.image_size, cache)

    def fingerprint(self) -> str:
        """Stable hash of class, category, image size and every file's path, size and mtime.

        Equal fingerprints mean the same pixels go in, so caches of features may be reused.
        """
        digest = hashlib.sha256(f"{type(self).__qualname__}|{self.category}|{self.image_size}".encode())
        for split, samples in (("train", self.train), ("test", self.test)):
            for sample in samples:
                digest.update(f"|{split}|{sample.label}|{_file_signature(sample.image)}".encode())
                if sample.mask is not None:
                    digest.update(f"|mask|{_file_signature(sample.mask)}".encode())
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        """One line describing the dataset, for logs."""
        anomalous = sum(sample.label for sample in self.test)
        masks = "with masks" if self.has_masks else "no masks: pixel metrics skipped"
        return (
            f"{self.name}/{self.category} at {self.image_size}px: {len(self.train)} train, "
            f"{len(self.test)} test ({anomalous} anomalous, defects: {', '.join(self.defects) or 'none'}), {masks}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"


def _file_signature(path: Path) -> str:
    """Path, byte size and modification time of a file: changes whenever its content is rewritten."""
    try:
        stat = path.stat()
    except OSError as error:
        raise ADError(f"{path}: cannot read file ({error.strerror}); restore it or rebuild the dataset") from error
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
