"""Dataset from plain folders: good images, optionally abnormal images and their masks.

For users whose data is not in the MVTec layout; good test images come from their own folder or are a
seeded, deterministic hold-out of the good ones. Good images alone are a valid dataset: the run then
sets its thresholds and measures the false-reject rate on held-out good images.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ad.data.base import AnomalyDataset, Sample, check_image_size, seeded_split
from ad.data.io import IMAGE_EXTENSIONS, index_masks, list_images
from ad.errors import ADError

log = logging.getLogger(__name__)

GOOD = "good"
_EXTENSIONS = ", ".join(IMAGE_EXTENSIONS)


class Folder(AnomalyDataset):
    """Good images from ``normal_dir``; anomalous ones from ``abnormal_dir`` with masks from ``mask_dir``.

    ``abnormal_val_dir`` holds labelled defective validation images, for ``threshold.method=f1``.
    """

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
        val_ratio: float = 0.0,
        abnormal_val_dir: str | None = None,
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
            log.info("dataset.abnormal_dir is not set: the test split holds good images only, so the run "
                     "measures its false-reject rate; AUROC and F1 need defective images")
        train, good_val = seeded_split(train, val_ratio, seed, "dataset.val_ratio")
        val = [Sample(image=path, label=0, defect=GOOD) for path in good_val]
        if abnormal_val_dir is not None:
            val += abnormal_samples(images_in("dataset.abnormal_val_dir", abnormal_val_dir), None)
        super().__init__(
            str(category),
            image_size,
            train=[Sample(image=path, label=0, defect=GOOD) for path in train],
            test=test,
            has_masks=mask_dir is not None,
            val=val,
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
    """Hold out ``test_split_ratio`` of the good images as good test images: same seed, same split."""
    train, held_out = seeded_split(images, test_split_ratio, seed, "dataset.test_split_ratio")
    log.info("held out %d of %d good images of dataset.normal_dir as good test images "
             "(dataset.test_split_ratio=%s, dataset.seed=%s)", len(held_out), len(images), test_split_ratio, seed)
    return train, held_out


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
