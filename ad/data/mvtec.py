"""Reader for the MVTec AD folder layout, which also serves any user data arranged the same way.

``<root>/<category>/train/good/*``, ``test/<good|defect>/*`` and, optionally,
``ground_truth/<defect>/<stem>_mask.*``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ad.data.base import AnomalyDataset, Sample, check_category, check_image_size
from ad.data.download import Archive, download_dataset
from ad.data.io import IMAGE_EXTENSIONS, index_masks, list_images
from ad.errors import ADError, did_you_mean

log = logging.getLogger(__name__)

GOOD = "good"
_EXTENSIONS = ", ".join(IMAGE_EXTENSIONS)
_DOWNLOAD_HINT = (
    "set dataset.download=true, or download MVTec AD (https://www.mvtec.com/company/research/datasets/mvtec-ad) "
    "and point dataset.root at it"
)


class MVTecAD(AnomalyDataset):
    """One category of MVTec AD, or of any dataset in its folder layout.

    ``categories`` lists the dataset's categories: a category outside it is accepted only when its
    folder exists (your own data in this layout). ``download=True`` fetches ``archive`` into ``root``
    first when the category is missing.
    """

    name = "mvtec"

    def __init__(
        self,
        root: str = "./datasets/MVTecAD",
        category: str = "bottle",
        image_size: int = 256,
        categories: Sequence[str] | None = None,
        download: bool = False,
        archive: Mapping | None = None,
        val_ratio: float = 0.0,
        seed: int = 42,
    ) -> None:
        check_image_size(image_size)
        self.root = Path(root).expanduser().absolute()
        if download:
            check_category(str(category), categories, "MVTec AD")
            required = [f"{name}/{split}" for name in categories or [category] for split in ("train", "test")]
            download_dataset(self.root, Archive.from_config(archive), present=self.root / str(category),
                             required=required)
        category_dir = find_category_dir(self.root, str(category), categories)
        train = read_train_samples(category_dir)
        test, has_masks = attach_masks(category_dir, read_test_samples(category_dir))
        super().__init__(str(category), image_size, train, test, has_masks, val_ratio=val_ratio, seed=seed)


def available_categories(root: Path) -> list[str]:
    """Sorted names of the folders under ``root`` that look like categories (they hold ``train/``)."""
    return sorted(path.name for path in root.iterdir() if (path / "train").is_dir())


def find_category_dir(root: Path, category: str, categories: Sequence[str] | None = None) -> Path:
    """The folder of ``category`` under ``root``, or an ADError saying what exists instead."""
    if not root.is_dir():
        raise ADError(f"dataset.root: folder '{root}' does not exist; {_DOWNLOAD_HINT}")
    category_dir = root / category
    if category and category_dir.is_dir():
        return category_dir
    available = available_categories(root)
    if categories is not None and category not in [str(name) for name in categories]:
        found = f"; folders in '{root}': {', '.join(available)}" if available else ""
        raise ADError(
            f"dataset.category: '{category}' is not a category of MVTec AD; "
            f"{did_you_mean(category, categories)}(valid: "
            f"{', '.join(str(name) for name in categories)}) nor a folder in '{root}'{found}"
        )
    if not available:
        raise ADError(
            f"dataset.category: '{category}' not found, and '{root}' holds no category folders "
            f"(<category>/train/good/); point dataset.root at the folder that contains them"
        )
    raise ADError(f"dataset.category: '{category}' not found in '{root}'; {did_you_mean(category, available)}"
                  f"available: {', '.join(available)}")


def read_train_samples(category_dir: Path) -> list[Sample]:
    """Good training samples from ``train/good``; at least one is required."""
    good_dir = category_dir / "train" / GOOD
    images = list_images(good_dir)
    if not images:
        state = "has no images" if good_dir.is_dir() else "does not exist"
        raise ADError(f"{good_dir}: folder {state} ({_EXTENSIONS}); put the defect-free training images there")
    return [Sample(image=path, label=0, defect=GOOD) for path in images]


def read_test_samples(category_dir: Path) -> list[Sample]:
    """Test samples from ``test/<good|defect>/``, labelled by folder name, without masks yet."""
    test_dir = category_dir / "test"
    folders = sorted(path for path in test_dir.iterdir() if path.is_dir()) if test_dir.is_dir() else []
    samples = [
        Sample(image=path, label=int(folder.name != GOOD), defect=folder.name)
        for folder in folders
        for path in list_images(folder)
    ]
    if not samples:
        raise ADError(f"{test_dir}: no test images in test/good/ or test/<defect type>/ ({_EXTENSIONS}); add some")
    return samples


def attach_masks(category_dir: Path, samples: list[Sample]) -> tuple[list[Sample], bool]:
    """Give each anomalous sample its ``ground_truth`` mask, matched by file stem.

    Without a ``ground_truth`` folder there are no masks (pixel metrics are skipped); with one, every
    anomalous image must have its mask, because a silently missing mask would corrupt pixel metrics.
    """
    truth_dir = category_dir / "ground_truth"
    if not truth_dir.is_dir():
        log.warning("%s does not exist: no ground-truth masks, pixel metrics will be skipped", truth_dir)
        return samples, False
    masks_by_defect = {defect: index_masks(truth_dir / defect) for defect in {s.defect for s in samples}}
    with_masks = []
    for sample in samples:
        if sample.label == 1:
            mask = masks_by_defect[sample.defect].get(sample.image.stem)
            if mask is None:
                expected = truth_dir / sample.defect / f"{sample.image.stem}_mask.png"
                raise ADError(
                    f"{sample.image}: no ground-truth mask, expected {expected}; "
                    f"add it, or remove {truth_dir} to skip pixel metrics"
                )
            sample = dataclasses.replace(sample, mask=mask)
        with_masks.append(sample)
    return with_masks, True
