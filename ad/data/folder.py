"""Dataset from plain folders: good images, optionally abnormal images and their masks.

For users whose data is not in the MVTec layout; good test images come from their own folder or are a
seeded, deterministic hold-out of the good ones.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ad.data.base import AnomalyDataset, Sample, check_image_size
from ad.data.io import IMAGE_EXTENSIONS, index_masks, list_images
from ad.errors import ADError

log = logging.getLogger(__name__)

GOOD = "good"
_EXTENSIONS = ", ".join(IMAGE_EXTENSIONS)


class Folder(AnomalyDataset):
    """Good images from ``normal_dir``; anomalous ones from ``abnormal_dir`` with masks from ``mask_dir``."""

    name = "folder"

    def __init__(
        self,
        normal_dir: str,
        abnormal_dir: str | None = None,
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
        test_split_ratio: float = 0.2,
        seed: int = 42,
        image_size: int = 256,
        category: str = "folder",
    ) -> None:
        check_image_size(image_size)
        if mask_dir is not None and abnormal_dir is None:
            raise ADError("dataset.mask_dir: set, but dataset.abnormal_dir is not; set dataset.abnormal_dir too")
        normals = images_in("dataset.normal_dir", normal_dir)
        if normal_test_dir is not None:
            train, good_test = normals, images_in("dataset.normal_test_dir", normal_test_dir)
        else:
            train, good_test = split_normals(normals, test_split_ratio, seed)
        test = [Sample(image=path, label=0, defect=GOOD) for path in good_test]
        if abnormal_dir is not None:
            test += abnormal_samples(images_in("dataset.abnormal_dir", abnormal_dir), mask_dir)
        else:
            log.warning("dataset.abnormal_dir is not set: the test split has no anomalous images to score")
        super().__init__(
            str(category),
            image_size,
            train=[Sample(image=path, label=0, defect=GOOD) for path in train],
            test=test,
            has_masks=mask_dir is not None,
        )


def images_in(key: str, folder: str) -> list[Path]:
    """Sorted images of the folder given by config ``key``; ADError if it is missing or has none."""
    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        raise ADError(f"{key}: folder '{path}' does not exist; point {key} at a folder of images")
    images = list_images(path)
    if not images:
        raise ADError(f"{key}: folder '{path}' has no images ({_EXTENSIONS}); point {key} at a folder of images")
    return images


def split_normals(images: list[Path], test_split_ratio: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Hold out ``test_split_ratio`` of the good images as good test images: same seed, same split.

    Images are ranked by a hash of seed and file name, so the split does not depend on listing order
    or library versions, and adding images leaves earlier assignments mostly unchanged.
    """
    if not 0.0 <= test_split_ratio < 1.0:
        raise ADError(f"dataset.test_split_ratio: must be in [0, 1), got {test_split_ratio!r}")
    n_test = round(len(images) * test_split_ratio)
    if test_split_ratio > 0 and n_test == 0:
        n_test = 1
    if n_test >= len(images):
        raise ADError(
            f"dataset.test_split_ratio: holding out {test_split_ratio} of {len(images)} good images leaves none "
            f"to train on; add images to dataset.normal_dir or set dataset.normal_test_dir"
        )
    ranked = sorted(images, key=lambda path: hashlib.sha256(f"{seed}|{path.name}".encode()).hexdigest())
    held_out = set(ranked[:n_test])
    log.info(
        "held out %d of %d good images of dataset.normal_dir as good test images "
        "(dataset.test_split_ratio=%s, dataset.seed=%s)",
        n_test,
        len(images),
        test_split_ratio,
        seed,
    )
    return [path for path in images if path not in held_out], [path for path in images if path in held_out]


def abnormal_samples(images: list[Path], mask_dir: str | None) -> list[Sample]:
    """Anomalous samples, each with its mask (``<stem>.<ext>`` or ``<stem>_mask.<ext>``) when masks are given."""
    defect = images[0].parent.name
    if mask_dir is None:
        return [Sample(image=path, label=1, defect=defect) for path in images]
    masks_folder = images_in("dataset.mask_dir", mask_dir)[0].parent
    masks = index_masks(masks_folder)
    missing = [path for path in images if path.stem not in masks]
    if missing:
        expected = masks_folder / f"{missing[0].stem}.png"
        raise ADError(
            f"dataset.mask_dir: no mask for {missing[0]} ({len(missing)} image(s) lack one), expected {expected} "
            f"or {missing[0].stem}_mask.png next to it; add the masks"
        )
    return [Sample(image=path, label=1, defect=defect, mask=masks[path.stem]) for path in images]
