"""dataset=visa: the split CSV read directly, 0/1 and 0/255 masks, and every malformed-input error."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, compose_config
from hydra.utils import instantiate
from PIL import Image
from test_btad import defect_box, part_image

from ad.data import VisA, read_mask
from ad.errors import ADError
from ad.run import run

#: Per category: the value of defect pixels in its masks (VisA's sources differ).
MASK_VALUES = {"candle": 255, "pcb1": 1}
N_TRAIN, N_TEST_GOOD, N_TEST_BAD = 8, 3, 3
SPLIT = "split_csv/1cls.csv"


def make_visa(root: Path) -> Path:
    """A tiny VisA download: ``<category>/Data/{Images,Masks}/...`` and ``split_csv/1cls.csv``."""
    rows = [("object", "split", "label", "image", "mask")]
    for category, on_value in MASK_VALUES.items():
        data = f"{category}/Data"
        for i in range(N_TRAIN + N_TEST_GOOD):
            image = f"{data}/Images/Normal/{i:04d}.JPG"
            part_image(root / image, seed=i)
            rows.append((category, "train" if i < N_TRAIN else "test", "normal", image, ""))
        for i in range(N_TEST_BAD):
            image, mask = f"{data}/Images/Anomaly/{i:03d}.JPG", f"{data}/Masks/Anomaly/{i:03d}.png"
            part_image(root / image, seed=200 + i, defect=defect_box(200 + i))
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(defect_box(200 + i).astype(np.uint8) * on_value).save(root / mask)
            rows.append((category, "test", "anomaly", image, mask))
    write_split(root / SPLIT, rows)
    return root


def write_split(path: Path, rows: list[tuple[str, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)


def read_split(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_visa(tmp_path_factory.mktemp("visa"))


@pytest.fixture
def visa_copy(visa_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(visa_root, tmp_path / "visa"))


@pytest.mark.parametrize("category", list(MASK_VALUES))
def test_split_file_gives_train_test_and_binary_masks(visa_root: Path, category: str) -> None:
    dataset = VisA(root=str(visa_root), category=category, image_size=32)
    assert (dataset.name, dataset.category, dataset.has_masks) == ("visa", category, True)
    assert len(dataset.train) == N_TRAIN and all(s.label == 0 and s.mask is None for s in dataset.train)
    assert [s.label for s in dataset.test] == [0] * N_TEST_GOOD + [1] * N_TEST_BAD
    assert dataset.defects == ["bad"] and all(s.image.parts[-5] == category for s in dataset.test)
    for i, sample in enumerate(s for s in dataset.test if s.label == 1):
        assert np.array_equal(read_mask(sample.mask), defect_box(200 + i))  # 0/1 and 0/255 alike
    items = dataset.test_set()
    assert items[0]["mask"].sum() == 0 and set(items[len(items) - 1]["mask"].unique().tolist()) == {0, 1}


def test_missing_split_file_names_the_path(visa_copy: Path) -> None:
    (visa_copy / SPLIT).unlink()
    with pytest.raises(ADError, match="split file") as error:
        VisA(root=str(visa_copy), category="candle")
    assert str(visa_copy / SPLIT) in str(error.value) and "dataset.download=true" in str(error.value)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ADError, match=r"dataset\.root: folder '.*nowhere' does not exist"):
        VisA(root=str(tmp_path / "nowhere"), category="candle")


def test_unknown_category_lists_the_valid_ones(visa_root: Path) -> None:
    categories = compose_config("dataset=visa").dataset.categories
    assert len(categories) == 12
    expected = r"'candel' is not a category of VisA; did you mean 'candle'\? valid: candle, capsules, cashew"
    with pytest.raises(ADError, match=expected):
        VisA(root=str(visa_root), category="candel", categories=categories)
    with pytest.raises(ADError, match=r"'cashew' has no rows in .*1cls\.csv; categories there: candle, pcb1"):
        VisA(root=str(visa_root), category="cashew", categories=categories)


def test_missing_column_is_named(visa_copy: Path) -> None:
    write_split(visa_copy / SPLIT, [tuple(row[:4]) for row in read_split(visa_copy / SPLIT)])
    with pytest.raises(ADError, match=r"1cls\.csv: missing column\(s\) mask"):
        VisA(root=str(visa_copy), category="candle")


@pytest.mark.parametrize(
    ("edit", "message"),
    [({4: ""}, r"1cls\.csv:\d+: anomalous image .*000\.JPG has no mask"),
     ({1: "val"}, r"1cls\.csv:\d+: split 'val' / label 'anomaly' must be one of train/test"),
     ({1: "train"}, r"1cls\.csv:\d+: anomalous image .* in the train split"),
     ({3: "../../etc/passwd"}, r"1cls\.csv:\d+: path '\.\./\.\./etc/passwd' points outside dataset\.root"),
     ({3: "candle/Data/Images/Anomaly/gone.JPG"}, r"gone\.JPG: file listed in .*1cls\.csv not found")],
    ids=["no-mask", "bad-split", "anomaly-in-train", "traversal", "missing-file"],
)
def test_bad_rows_are_named_with_their_line(visa_copy: Path, edit: dict[int, str], message: str) -> None:
    rows = read_split(visa_copy / SPLIT)
    first_anomaly = next(i for i, row in enumerate(rows) if row[0] == "candle" and row[2] == "anomaly")
    for column, value in edit.items():
        rows[first_anomaly][column] = value
    write_split(visa_copy / SPLIT, [tuple(row) for row in rows])
    with pytest.raises(ADError, match=message):
        VisA(root=str(visa_copy), category="candle")


def test_config_instantiates(visa_root: Path) -> None:
    cfg = compose_config("dataset=visa", f"dataset.root={visa_root}", "dataset.category=pcb1")
    assert cfg.dataset.split_file == SPLIT and cfg.dataset.download is False
    assert instantiate(cfg.dataset).category == "pcb1"


def test_end_to_end_padim(visa_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(*TINY, "dataset=visa", f"dataset.root={visa_root}", "dataset.category=pcb1", "tracking=none")
    results = run(cfg, tmp_path)
    assert (results["dataset"], results["category"]) == ("visa", "pcb1")
    assert (results["n_train"] + results["n_val"], results["n_test"]) == (N_TRAIN, N_TEST_GOOD + N_TEST_BAD)
    assert results["image_AUROC"] > 0.9 and results["pixel_AUROC"] > 0.9  # dark patches on smooth grey
