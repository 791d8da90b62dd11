"""Torch views over a dataset's samples: normalised image tensors for the backbone, and back for display."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ad.cache import DiskCache
from ad.data.base import IMAGENET_MEAN, IMAGENET_STD, Sample, cached_decoded, decode_into, load_decoded
from ad.threads import map_on_cores

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_SCALE, _SHIFT = 1.0 / (255.0 * _STD), -_MEAN / _STD  # normalise uint8 in one multiply-add


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) image to an ImageNet-normalised float32 (3, H, W) tensor, as backbones expect."""
    return normalize_batch(image[None])[0].contiguous()


def normalize_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) images to ImageNet-normalised float32 (B, 3, H, W), channels-last in memory.

    One multiply-add over the batch in the pixels' own interleaved layout, which is the layout the
    backbone runs in: no reorder, here or before the first convolution. The per-channel constants are
    tiled along a whole image row, so the ops broadcast over rows of 3·W values rather than over
    triples (4x faster; the same floats).
    """
    b, h, w, _ = images.shape
    rows = torch.from_numpy(np.ascontiguousarray(images)).view(b * h, w * 3).float()
    rows.mul_(_SCALE.view(3).repeat(w)).add_(_SHIFT.view(3).repeat(w))
    return rows.view(b, h, w, 3).permute(0, 3, 1, 2)


def collate(items: list[dict]) -> dict:
    """``default_collate`` for ImageDataset items, except that images are stacked in the memory layout
    they were made in (channels-last, see ``normalize_batch``) instead of NCHW."""
    images = [item["image"] for item in items]
    batch = default_collate([{key: value for key, value in item.items() if key != "image"} for item in items])
    first = images[0]
    if first.ndim == 3 and first.permute(1, 2, 0).is_contiguous() and not first.is_contiguous():
        out = torch.empty((len(images), *first.shape), dtype=first.dtype).to(memory_format=torch.channels_last)
        batch["image"] = torch.stack(images, out=out)
    else:
        batch["image"] = default_collate(images)
    return batch


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
        item = self._items([index], [load_decoded(self.samples[index], self.image_size, self.cache)])[0]
        return {**item, "image": item["image"].contiguous()}  # one image: plain NCHW, whatever reads it

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor | str]]:
        """A batch's items (what the DataLoader asks for): cached images read in turn, the rest decoded
        on one thread per core.

        Pillow's decoding and resizing release the GIL, so images not yet in the cache decode at the
        speed of every core instead of one, between backbone passes; reading a cached file takes ~0.2 ms,
        less than handing it to a thread. The batch is then normalised in one pass (``normalize_batch``;
        ``collate`` keeps its layout). Inside DataLoader worker processes, which already run side by
        side, images are decoded one by one.
        """
        decoded = [self._cached(index) for index in indices]  # reading cached files: faster on one thread
        missing = [position for position, found in enumerate(decoded) if found is None]
        if missing:
            todo = [indices[position] for position in missing]
            fresh = [self._decode(index) for index in todo] if get_worker_info() is not None \
                else map_on_cores(self._decode, todo, name="ad-read")
            for position, found in zip(missing, fresh, strict=True):
                decoded[position] = found
        return self._items(indices, decoded)

    def _cached(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.cache is None else cached_decoded(self.samples[index], self.image_size, self.cache)

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return decode_into(self.cache, self.samples[index], self.image_size)

    def _items(self, indices: Sequence[int], decoded: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        images = normalize_batch(np.stack([image for image, _ in decoded]))
        return [
            {
                "image": images[position],
                "mask": torch.from_numpy(np.ascontiguousarray(mask)),
                "label": torch.tensor(self.samples[index].label, dtype=torch.int64),
                "path": str(self.samples[index].image),
            }
            for position, (index, (_, mask)) in enumerate(zip(indices, decoded, strict=True))
        ]
