"""Reader for VisA (Visual Anomaly), straight from its public download and split file.

The download holds ``<root>/<category>/Data/{Images,Masks}/...`` and ``<root>/split_csv/1cls.csv``
with columns ``object,split,label,image,mask`` (paths relative to root). anomalib copies every file
into an MVTec-style tree first; reading the CSV directly gives the same split without a second copy
of the dataset on disk or a conversion step that can be interrupted half-way. Masks are 0/255 or
0/1 depending on the source; :func:`ad.data.io.read_mask` counts any non-zero pixel as defect.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path

from ad.data.base import AnomalyDataset, Sample, check_category, check_image_size
from ad.data.download import Archive, download_dataset
from ad.errors import ADError

COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS, LABELS = ("train", "test"), ("normal", "anomaly")
DEFECT = "bad"  # anomalib's folder name for VisA's anomalous images
_DOWNLOAD_HINT = (
    "set dataset.download=true, or download VisA "
    "(https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar), extract it and point "
    "dataset.root at the folder holding split_csv/"
)


class VisA(AnomalyDataset):
    """One category of VisA, split as its ``split_file`` (default: the one-class split ``1cls.csv``) says."""

    name = "visa"

    def __init__(
        self,
        root: str = "./datasets/VisA",
        category: str = "candle",
        image_size: int = 256,
        categories: Sequence[str] | None = None,
        split_file: str = "split_csv/1cls.csv",
        download: bool = False,
        archive: Mapping | None = None,
        val_ratio: float = 0.0,
        seed: int = 42,
    ) -> None:
        check_image_size(image_size)
        category = str(category)
        self.root = Path(root).expanduser().absolute()
        self.split_file = self.root / split_file
        if download:
            check_category(category, categories, "VisA")
            required = [f"{name}/Data" for name in categories or [category]]
            download_dataset(self.root, Archive.from_config(archive), present=self.split_file, required=required)
        if not self.root.is_dir():
            raise ADError(f"dataset.root: folder '{self.root}' does not exist; {_DOWNLOAD_HINT}")
        if not self.split_file.is_file():
            raise ADError(f"dataset.root: split file '{self.split_file}' not found (dataset.split_file); "
                          f"VisA ships it in split_csv/; {_DOWNLOAD_HINT}")
        rows = read_split(self.split_file)
        found = sorted({row["object"] for _, row in rows})
        if category not in found:
            check_category(category, categories, "VisA")
            raise ADError(f"dataset.category: '{category}' has no rows in {self.split_file}; "
                          f"categories there: {', '.join(found)}")
        train, test = samples_of(category, rows, self.root, self.split_file)
        super().__init__(category, image_size, train, test, has_masks=True, val_ratio=val_ratio, seed=seed)


def read_split(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of a VisA split CSV with their line numbers; ADError naming the file if it is malformed."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise ADError(f"{path}: missing column(s) {', '.join(missing)}; a VisA split file has columns "
                              f"{','.join(COLUMNS)}")
            return [(reader.line_num, {key: (row[key] or "").strip() for key in COLUMNS}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ADError(f"{path}: cannot read the split file ({error}); restore it from the VisA download") from error


def samples_of(
    category: str, rows: list[tuple[int, dict[str, str]]], root: Path, split_file: Path
) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples of one category; every file must exist and every anomaly have a mask."""
    train, test = [], []
    for line, row in rows:
        if row["object"] != category:
            continue
        where = f"{split_file}:{line}"
        if row["split"] not in SPLITS or row["label"] not in LABELS:
            raise ADError(f"{where}: split '{row['split']}' / label '{row['label']}' must be one of "
                          f"{'/'.join(SPLITS)} and {'/'.join(LABELS)}; fix the split file")
        anomalous = row["label"] == "anomaly"
        if anomalous and row["split"] == "train":
            raise ADError(f"{where}: anomalous image {row['image']} in the train split; "
                          f"one-class training needs normal images only")
        if anomalous and not row["mask"]:
            raise ADError(f"{where}: anomalous image {row['image']} has no mask; add its mask path to the split file")
        sample = Sample(
            image=dataset_file(root, row["image"], where),
            label=int(anomalous),
            defect=DEFECT if anomalous else "good",
            mask=dataset_file(root, row["mask"], where) if anomalous else None,
        )
        (test if row["split"] == "test" else train).append(sample)
    if not train or not test:
        raise ADError(f"{split_file}: category '{category}' has no {'train' if not train else 'test'} rows; "
                      f"use the split file of the VisA download")
    missing = [path for sample in train + test for path in (sample.image, sample.mask) if path and not path.is_file()]
    if missing:
        raise ADError(f"{missing[0]}: file listed in {split_file} not found ({len(missing)} missing); "
                      f"restore the dataset from the VisA download")
    return train, test


def dataset_file(root: Path, relative: str, where: str) -> Path:
    """``root / relative`` for a path from the split file, refusing absolute paths and ``..``."""
    normal = posixpath.normpath(relative.replace("\\", "/"))
    if normal.startswith(("/", "../")) or normal == ".." or Path(relative).is_absolute():
        raise ADError(f"{where}: path '{relative}' points outside dataset.root; paths must be relative to it")
    return root / normal
