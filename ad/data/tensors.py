"""Torch views over a dataset's samples: normalised image tensors for the backbone, and back for display."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ad.cache import DiskCache
from ad.data.base import IMAGENET_MEAN, IMAGENET_STD, Sample, load_decoded
from ad.threads import map_on_cores, single_threaded

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_SCALE, _SHIFT = 1.0 / (255.0 * _STD), -_MEAN / _STD  # normalise uint8 in one multiply-add


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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index]
        image, mask = load_decoded(sample, self.image_size, self.cache)
        return {
            "image": normalize(image),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "path": str(sample.image),
        }

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor | str]]:
        """A batch's items (what the DataLoader asks for), read on one thread per core.

        Pillow's decoding and resizing, file reads and torch all release the GIL, so images not yet
        in the cache decode at the speed of every core instead of one, between backbone passes.
        Inside DataLoader worker processes, which already run side by side, items are read one by one.
        """
        if get_worker_info() is not None:
            return [self[index] for index in indices]
        workers = torch.get_num_threads()
        with single_threaded(torch.device("cpu")):  # torch inside each item: one thread per item
            return map_on_cores(self.__getitem__, indices, workers, name="ad-read")
