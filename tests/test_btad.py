"""dataset=btad: the public layout with mixed .bmp/.png files, masks matched by stem, and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, compose_config
from hydra.utils import instantiate
from PIL import Image

from ad.data import BTAD, read_mask
from ad.errors import ADError
from ad.run import run

WIDTH, HEIGHT = 48, 40  # not square, like the real (larger) BTAD images
#: Per product: image extension, mask extension and the value of defect pixels in the mask.
FORMATS = {"01": (".bmp", ".png", 255), "02": (".png", ".png", 1), "03": (".bmp", ".bmp", 255)}
N_TRAIN, N_TEST_OK, N_TEST_KO = 8, 3, 3


def defect_box(seed: int) -> np.ndarray:
    """A bool (H, W) mask with one seeded rectangle: where the defect is painted."""
    rng = np.random.default_rng(seed)
    box = np.zeros((HEIGHT, WIDTH), dtype=bool)
    top, left = rng.integers(2, HEIGHT - 14), rng.integers(2, WIDTH - 14)
    box[top : top + rng.integers(8, 12), left : left + rng.integers(8, 12)] = True
    return box


def part_image(path: Path, seed: int, defect: np.ndarray | None = None) -> None:
    """A smooth grey part with mild noise; a defect is a dark patch."""
    rng = np.random.default_rng(seed)
    pixels = 128 + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
    if defect is not None:
        pixels[defect] = 30
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_btad(root: Path, categories: tuple[str, ...] = tuple(FORMATS)) -> Path:
    """A tiny BTAD tree: per product, good train/test images, defective ones, and their masks."""
    for category in categories:
        image_ext, mask_ext, on_value = FORMATS[category]
        folder = root / category
        for i in range(N_TRAIN):
            part_image(folder / "train" / "ok" / f"{i:04d}{image_ext}", seed=i)
        for i in range(N_TEST_OK):
            part_image(folder / "test" / "ok" / f"{i:04d}{image_ext}", seed=100 + i)
        for i in range(N_TEST_KO):
            box = defect_box(200 + i)
            part_image(folder / "test" / "ko" / f"{i:04d}{image_ext}", seed=200 + i, defect=box)
            mask_path = folder / "ground_truth" / "ko" / f"{i:04d}{mask_ext}"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(box.astype(np.uint8) * on_value).save(mask_path)
    return root


@pytest.fixture(scope="module")
def btad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_btad(tmp_path_factory.mktemp("btad"))


@pytest.fixture
def btad_copy(btad_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(btad_root, tmp_path / "btad"))


@pytest.mark.parametrize("category", list(FORMATS))
def test_layout_labels_and_masks_across_extensions(btad_root: Path, category: str) -> None:
    image_ext, mask_ext, _ = FORMATS[category]
    dataset = BTAD(root=str(btad_root), category=category, image_size=32)
    assert (dataset.name, dataset.category, dataset.has_masks) == ("btad", category, True)
    assert len(dataset.train) == N_TRAIN and all(s.label == 0 for s in dataset.train)
    assert [s.label for s in dataset.test] == [0] * N_TEST_OK + [1] * N_TEST_KO
    assert dataset.defects == ["ko"]
    for i, sample in enumerate(s for s in dataset.test if s.label == 1):
        assert (sample.image.suffix, sample.mask.suffix, sample.mask.stem) == (image_ext, mask_ext, sample.image.stem)
        assert np.array_equal(read_mask(sample.mask), defect_box(200 + i))  # 0/1 and 0/255 alike
    items = dataset.test_set()
    assert items[0]["mask"].sum() == 0 and items[len(items) - 1]["mask"].sum() > 0


def test_integer_category_means_the_zero_padded_product(btad_root: Path) -> None:
    assert BTAD(root=str(btad_root), category=2, image_size=32).category == "02"


def test_missing_mask_names_the_image(btad_copy: Path) -> None:
    (btad_copy / "01" / "ground_truth" / "ko" / "0001.png").unlink()
    with pytest.raises(ADError, match="no ground-truth mask") as error:
        BTAD(root=str(btad_copy), category="01")
    assert str(btad_copy / "01" / "test" / "ko" / "0001.bmp") in str(error.value)


def test_unknown_category_lists_the_valid_ones(btad_root: Path) -> None:
    with pytest.raises(ADError, match=r"dataset\.category: '04' is not a category of BTAD; valid: 01, 02, 03"):
        BTAD(root=str(btad_root), category="04", categories=["01", "02", "03"])


def test_missing_product_or_root_says_how_to_get_it(btad_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(btad_copy / "03")
    with pytest.raises(ADError, match=r"dataset\.root: '.*btad' has no folder '03'; set dataset\.download=true"):
        BTAD(root=str(btad_copy), category="03", categories=["01", "02", "03"])
    with pytest.raises(ADError, match=r"dataset\.root: '.*nowhere' does not exist"):
        BTAD(root=str(tmp_path / "nowhere"), category="01")


def test_empty_train_folder_is_named(btad_copy: Path) -> None:
    shutil.rmtree(btad_copy / "02" / "train" / "ok")
    with pytest.raises(ADError, match="does not exist") as error:
        BTAD(root=str(btad_copy), category="02")
    assert str(btad_copy / "02" / "train" / "ok") in str(error.value)


def test_config_lists_products_as_strings(btad_root: Path) -> None:
    cfg = compose_config("dataset=btad", f"dataset.root={btad_root}", "dataset.category=03")
    assert list(cfg.dataset.categories) == ["01", "02", "03"] and cfg.dataset.download is False
    assert instantiate(cfg.dataset).category == "03"


def test_end_to_end_padim(btad_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(*TINY, "dataset=btad", f"dataset.root={btad_root}", "dataset.category=1", "tracking=none")
    results = run(cfg, tmp_path)
    assert (results["dataset"], results["category"]) == ("btad", "01")
    assert (results["n_train"] + results["n_val"], results["n_test"]) == (N_TRAIN, N_TEST_OK + N_TEST_KO)
    assert results["image_AUROC"] > 0.9 and results["pixel_AUROC"] > 0.9  # dark patches on smooth grey


def test_run_with_an_unknown_product_stops_with_the_valid_ones(btad_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(*TINY, "dataset=btad", f"dataset.root={btad_root}", "dataset.category=04", "tracking=none")
    with pytest.raises(ADError, match=r"^dataset\.category: '04' is not a category of BTAD; valid: 01, 02, 03$"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()
