"""Reader for BTAD (beanTech Anomaly Detection), in the layout of its public download.

``<root>/<01|02|03>/train/ok/*``, ``test/<ok|ko>/*`` and ``ground_truth/ko/*``. Images and masks mix
.bmp and .png (a mask may differ in extension from its image), so they are matched by file stem and
read as they are, without anomalib's conversion of every .bmp to .png.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ad.data.base import AnomalyDataset, Sample, check_category, check_image_size
from ad.data.download import Archive, download_dataset
from ad.data.io import IMAGE_EXTENSIONS, index_masks, list_images
from ad.errors import ADError

GOOD, DEFECT = "ok", "ko"
_EXTENSIONS = ", ".join(IMAGE_EXTENSIONS)
_DOWNLOAD_HINT = (
    "set dataset.download=true, or download BTAD (https://avires.dimi.uniud.it/papers/btad/btad.zip) "
    "and point dataset.root at the folder holding 01, 02 and 03"
)


class BTAD(AnomalyDataset):
    """One product (``01``, ``02`` or ``03``) of BTAD; every ``ko`` test image must have its mask."""

    name = "btad"

    def __init__(
        self,
        root: str = "./datasets/BTAD",
        category: str | int = "01",
        image_size: int = 256,
        categories: Sequence[str] | None = None,
        download: bool = False,
        archive: Mapping | None = None,
        val_ratio: float = 0.0,
        seed: int = 42,
    ) -> None:
        check_image_size(image_size)
        category = f"{category:02d}" if isinstance(category, int) else str(category)  # dataset.category=1 -> "01"
        self.root = Path(root).expanduser().absolute()
        if download:
            check_category(category, categories, "BTAD")
            required = [f"{name}/{split}" for name in categories or [category] for split in ("train", "test")]
            download_dataset(self.root, Archive.from_config(archive), present=self.root / category, required=required)
        category_dir = self.root / category
        if not category_dir.is_dir():
            check_category(category, categories, "BTAD")
            state = "has no folder" if self.root.is_dir() else "does not exist, so it has no folder"
            raise ADError(f"dataset.root: '{self.root}' {state} '{category}'; {_DOWNLOAD_HINT}")
        train = [Sample(image=path, label=0, defect="good") for path in required_images(category_dir / "train" / GOOD)]
        test = [Sample(image=path, label=0, defect="good") for path in required_images(category_dir / "test" / GOOD)]
        test += anomalous_samples(category_dir)
        super().__init__(category, image_size, train, test, has_masks=True, val_ratio=val_ratio, seed=seed)


def required_images(folder: Path) -> list[Path]:
    """Sorted images of ``folder``; ADError naming it when it is missing or empty."""
    images = list_images(folder)
    if not images:
        state = "has no images" if folder.is_dir() else "does not exist"
        raise ADError(f"{folder}: folder {state} ({_EXTENSIONS}); restore it from the BTAD download")
    return images


def anomalous_samples(category_dir: Path) -> list[Sample]:
    """``test/ko`` images, each with the ``ground_truth/ko`` mask of the same stem (any extension)."""
    masks_dir = category_dir / "ground_truth" / DEFECT
    masks = index_masks(masks_dir)
    samples = []
    for image in required_images(category_dir / "test" / DEFECT):
        if image.stem not in masks:
            raise ADError(
                f"{image}: no ground-truth mask, expected {masks_dir / image.stem}.png (or .bmp); "
                f"restore it from the BTAD download"
            )
        samples.append(Sample(image=image, label=1, defect=DEFECT, mask=masks[image.stem]))
    return samples
