"""Tests of the data layer: layouts, image decoding, masks, splits, synthetic generation and errors."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

import ad.data.synthetic as synthetic
from ad.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Folder,
    MVTecAD,
    Sample,
    Synthetic,
    denormalize,
    make_mvtec_layout,
    normalize,
    read_image,
    read_mask,
)
from ad.errors import ADError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
SIZE = 32


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep generated synthetic data out of the user's real cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AD_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small read-only MVTec-layout root, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_layout(root, "gravel", n_train=6, n_test_good=3, n_test_defect=5, image_size=64, seed=0)
    return root


@pytest.fixture
def mvtec_copy(tiny_mvtec: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny MVTec root, for tests that break it."""
    return Path(shutil.copytree(tiny_mvtec, tmp_path / "mvtec"))


def noise_image(path: Path, size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> Path:
    """Write a random RGB image (random, so that PNG compression leaves it large enough to truncate)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, mask: np.ndarray, on_value: int = 255) -> Path:
    """Write a bool mask as an 8-bit greyscale PNG with ``on_value`` for defect pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * on_value).save(path)
    return path


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """Write a 16-bit RGB PNG by hand (Pillow cannot encode one)."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


# ---------------------------------------------------------------- MVTec layout


def test_mvtec_layout_counts_labels_and_masks(tiny_mvtec: Path) -> None:
    dataset = MVTecAD(root=str(tiny_mvtec), category="gravel", image_size=SIZE)
    assert (dataset.name, dataset.category, dataset.image_size, dataset.has_masks) == ("mvtec", "gravel", SIZE, True)
    assert len(dataset.train) == 6 and all(
        s.label == 0 and s.defect == "good" and s.mask is None for s in dataset.train
    )
    good = [s for s in dataset.test if s.label == 0]
    bad = [s for s in dataset.test if s.label == 1]
    assert len(good) == 3 and all(s.defect == "good" and s.mask is None for s in good)
    assert len(bad) == 5 and dataset.defects == sorted(synthetic.DEFECTS)
    for sample in bad:
        assert sample.mask.name == f"{sample.image.stem}_mask.png"
        assert sample.mask.parent.name == sample.defect == sample.image.parent.name


def test_items_have_documented_types_and_shapes(tiny_mvtec: Path) -> None:
    dataset = MVTecAD(root=str(tiny_mvtec), category="gravel", image_size=SIZE)
    batch = next(iter(DataLoader(dataset.test_set(), batch_size=len(dataset.test))))
    assert batch["image"].shape == (len(dataset.test), 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (len(dataset.test), SIZE, SIZE) and batch["mask"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [s.label for s in dataset.test]
    assert batch["path"] == [str(s.image) for s in dataset.test]
    assert set(batch["mask"].unique().tolist()) <= {0, 1}
    per_image_defect = batch["mask"].flatten(1).amax(1)
    assert per_image_defect.tolist() == batch["label"].tolist()  # every anomalous image has a visible defect
    item = dataset.train_set()[0]
    assert item["label"].shape == () and int(item["mask"].sum()) == 0


def test_a_batch_read_side_by_side_equals_items_read_one_by_one(tiny_mvtec: Path) -> None:
    test_set = MVTecAD(root=str(tiny_mvtec), category="gravel", image_size=SIZE).test_set()
    indices = [4, 0, 7, 2, 5]
    together, alone = test_set.__getitems__(indices), [test_set[i] for i in indices]
    for got, want in zip(together, alone, strict=True):
        assert got["path"] == want["path"] and all(torch.equal(got[k], want[k]) for k in ("image", "mask", "label"))


def test_an_error_in_a_batch_read_side_by_side_names_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad" / "junk.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"this is not a png at all" * 10)
    for name in ("a.png", "z.png"):  # good files around it, read on the other threads
        noise_image(corrupt.parent / name)
    test_set = single_image_dataset(tmp_path, corrupt).test_set()
    assert len(test_set) == 3
    with pytest.raises(ADError, match="cannot read image") as error:
        next(iter(DataLoader(test_set, batch_size=len(test_set))))
    assert str(corrupt) in str(error.value)


def test_masks_are_matched_by_stem_not_sorted_order(tmp_path: Path) -> None:
    category = tmp_path / "root" / "part"
    noise_image(category / "train" / "good" / "0.png")
    for stem, seed in (("x1", 1), ("x10", 2)):  # sorted images: x1, x10; sorted masks: x10_mask, x1_mask
        noise_image(category / "test" / "dent" / f"{stem}.png", seed=seed)
        write_mask(category / "ground_truth" / "dent" / f"{stem}_mask.png", np.ones((SIZE, SIZE), bool))
    dataset = MVTecAD(root=str(tmp_path / "root"), category="part", image_size=SIZE)
    assert {s.image.stem: s.mask.name for s in dataset.test} == {"x1": "x1_mask.png", "x10": "x10_mask.png"}


def test_extensions_are_case_insensitive(tmp_path: Path) -> None:
    category = tmp_path / "root" / "part"
    noise_image(category / "train" / "good" / "a.PNG")
    noise_image(category / "train" / "good" / "b.JPG")
    (category / "train" / "good" / "notes.txt").write_text("not an image")
    noise_image(category / "test" / "good" / "c.Tiff")
    dataset = MVTecAD(root=str(tmp_path / "root"), category="part", image_size=SIZE)
    assert [s.image.name for s in dataset.train] == ["a.PNG", "b.JPG"] and len(dataset.test) == 1


def test_missing_ground_truth_folder_means_no_masks(mvtec_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(mvtec_copy / "gravel" / "ground_truth")
    with caplog.at_level(logging.WARNING):
        dataset = MVTecAD(root=str(mvtec_copy), category="gravel", image_size=SIZE)
    assert not dataset.has_masks and all(s.mask is None for s in dataset.test)
    assert "ground_truth" in caplog.text
    anomalous = next(i for i, s in enumerate(dataset.test) if s.label == 1)
    assert int(dataset.test_set()[anomalous]["mask"].sum()) == 0


def test_missing_mask_names_image_and_expected_path(mvtec_copy: Path) -> None:
    mask = next((mvtec_copy / "gravel" / "ground_truth" / "crack").iterdir())
    mask.unlink()
    with pytest.raises(ADError) as error:
        MVTecAD(root=str(mvtec_copy), category="gravel", image_size=SIZE)
    assert str(mask) in str(error.value) and mask.name.replace("_mask", "") in str(error.value)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ADError, match="dataset.root") as error:
        MVTecAD(root=str(tmp_path / "nowhere"), category="bottle")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_unknown_category_lists_available(tiny_mvtec: Path) -> None:
    with pytest.raises(ADError, match=r"dataset\.category: 'bottle'.*available: gravel"):
        MVTecAD(root=str(tiny_mvtec), category="bottle")


def test_empty_train_folder(mvtec_copy: Path) -> None:
    good = mvtec_copy / "gravel" / "train" / "good"
    for path in good.iterdir():
        path.unlink()
    with pytest.raises(ADError, match="has no images") as error:
        MVTecAD(root=str(mvtec_copy), category="gravel")
    assert str(good) in str(error.value)


def test_no_test_images(mvtec_copy: Path) -> None:
    shutil.rmtree(mvtec_copy / "gravel" / "test")
    with pytest.raises(ADError, match="no test images") as error:
        MVTecAD(root=str(mvtec_copy), category="gravel")
    assert str(mvtec_copy / "gravel" / "test") in str(error.value)


@pytest.mark.parametrize("image_size", [0, -3, 2.5, "256"])
def test_bad_image_size(tiny_mvtec: Path, image_size: object) -> None:
    with pytest.raises(ADError, match="dataset.image_size"):
        MVTecAD(root=str(tiny_mvtec), category="gravel", image_size=image_size)


# ---------------------------------------------------------------- bad files, raised when the item is loaded


def single_image_dataset(tmp_path: Path, image: Path) -> Folder:
    """A Folder dataset whose only test image is ``image``."""
    noise_image(tmp_path / "normal" / "0.png")
    return Folder(
        normal_dir=str(tmp_path / "normal"), abnormal_dir=str(image.parent), test_split_ratio=0.0, image_size=SIZE
    )


def test_corrupt_file_is_reported_when_loaded(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad" / "junk.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"this is not a png at all" * 10)
    test_set = single_image_dataset(tmp_path, corrupt).test_set()
    with pytest.raises(ADError, match="cannot read image") as error:
        test_set[0]
    assert str(corrupt) in str(error.value) and "\n" not in str(error.value)


def test_truncated_png(tmp_path: Path) -> None:
    image = noise_image(tmp_path / "bad" / "cut.png", size=(64, 64))
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(ADError, match="cannot read image") as error:
        read_image(image)
    assert str(image) in str(error.value) and "re-export or remove" in str(error.value)


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    image = noise_image(tmp_path / "bad" / "a.png", size=(40, 30))
    mask = write_mask(tmp_path / "masks" / "a_mask.png", np.ones((20, 20), bool))
    noise_image(tmp_path / "normal" / "0.png")
    dataset = Folder(
        normal_dir=str(tmp_path / "normal"),
        abnormal_dir=str(image.parent),
        mask_dir=str(mask.parent),
        test_split_ratio=0.0,
        image_size=SIZE,
    )
    with pytest.raises(ADError) as error:
        dataset.test_set()[0]
    message = str(error.value)
    assert str(image) in message and str(mask) in message and "40x30" in message and "20x20" in message


# ---------------------------------------------------------------- pixel formats


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    pixels = read_image(tmp_path / "a.png")
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, rgba[..., :3])


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "g.png")
    pixels = read_image(tmp_path / "g.png")
    assert pixels.shape == (8, 8, 3) and all(np.array_equal(pixels[..., c], grey) for c in range(3))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    grey16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0 .. 65520
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    pixels = read_image(tmp_path / "g16.png")
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels[..., 0].astype(int) - np.round(grey16 / 257)).max() <= 1


def test_sixteen_bit_rgb_is_scaled(tmp_path: Path) -> None:
    rgb16 = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    pixels = read_image(write_png16(tmp_path / "c16.png", rgb16))
    assert pixels.dtype == np.uint8 and np.abs(pixels.astype(int) - np.round(rgb16 / 257)).max() <= 1


def test_palette_image_uses_palette_colours(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = (200, 30, 10)
    rgb[4:] = (5, 90, 250)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), rgb)


def _png_variants(folder: Path) -> dict[str, Path]:
    """One PNG of each kind the decoder may meet: the 8-bit ones imagecodecs takes and the rest."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    paths = {name: folder / f"{name}.png" for name in
             ("rgb", "grey", "interlaced", "rgba", "palette", "grey4", "trns", "grey16", "rgb16")}
    Image.fromarray(rgb).save(paths["rgb"])
    Image.fromarray(grey).save(paths["grey"])
    Image.fromarray(rgb).save(paths["interlaced"], interlace=1)  # Pillow writes Adam7 only if asked
    Image.fromarray(np.dstack([rgb, grey])).save(paths["rgba"])
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette"])
    Image.fromarray(grey // 17).save(paths["grey4"], bits=4)
    Image.fromarray(rgb).save(paths["trns"], transparency=tuple(int(v) for v in rgb[0, 0]))
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["grey16"])
    write_png16(paths["rgb16"], rng.integers(0, 65536, (24, 40, 3)).astype(np.uint16))
    return paths


def test_fast_png_path_decodes_8_bit_greyscale_and_rgb_pngs_only(tmp_path: Path, monkeypatch) -> None:
    import ad.data.io as io

    decoded_fast = []
    real_decode = io.png_decode
    monkeypatch.setattr(io, "png_decode", lambda data: decoded_fast.append(data) or real_decode(data))
    paths = _png_variants(tmp_path)
    for name, path in paths.items():
        decoded_fast.clear()
        read_image(path)
        # 8-bit greyscale/RGB without a tRNS chunk -> imagecodecs; anything else stays with Pillow
        assert bool(decoded_fast) == (name in ("rgb", "grey", "interlaced")), name


@pytest.mark.parametrize("size", [None, 16])
def test_fast_png_path_gives_exactly_pillows_pixels(tmp_path: Path, monkeypatch, size) -> None:
    import ad.data.io as io

    paths = _png_variants(tmp_path)
    fast = {name: read_image(path, size) for name, path in paths.items()}
    fast_masks = {name: read_mask(path, size) for name, path in paths.items()}
    monkeypatch.setattr(io, "png_decode", None)
    for name, path in paths.items():
        assert np.array_equal(fast[name], read_image(path, size)), name
        assert np.array_equal(fast_masks[name], read_mask(path, size)), name


def test_corrupt_png_pixel_data_is_named_by_pillows_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[60:90] = b"\x00" * 30  # damage the compressed pixel data, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(ADError, match="cannot read image") as error:
        read_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_large_jpeg_resized(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(path, quality=95)
    pixels = read_image(path, size=SIZE)
    assert pixels.shape == (SIZE, SIZE, 3) and np.abs(pixels.astype(int) - 120).max() <= 2


@pytest.mark.parametrize("on_value", [1, 255])
def test_zero_one_and_zero_255_masks(tmp_path: Path, on_value: int) -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    path = write_mask(tmp_path / "m.png", mask, on_value)
    assert read_mask(path).dtype == bool and np.array_equal(read_mask(path), mask)
    assert np.array_equal(read_mask(path, size=16), mask.repeat(2, 0).repeat(2, 1))


def test_normalize_and_denormalize_round_trip() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    tensor = normalize(pixels)
    expected = torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(tensor, expected / torch.tensor(IMAGENET_STD)[:, None, None], atol=1e-5)
    assert np.array_equal(denormalize(tensor[None])[0], pixels) and denormalize(tensor).shape == (1, SIZE, SIZE, 3)


# ---------------------------------------------------------------- Folder


def folder_of_images(folder: Path, count: int) -> list[Path]:
    """``count`` distinct noise images in ``folder``."""
    return [noise_image(folder / f"img{index:02d}.png", seed=index) for index in range(count)]


def test_folder_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    images = folder_of_images(tmp_path / "normal", 10)
    first = Folder(normal_dir=str(tmp_path / "normal"), test_split_ratio=0.3, seed=7)
    again = Folder(normal_dir=str(tmp_path / "normal"), test_split_ratio=0.3, seed=7)
    other = Folder(normal_dir=str(tmp_path / "normal"), test_split_ratio=0.3, seed=8)
    train, test = {s.image for s in first.train}, {s.image for s in first.test}
    assert len(test) == 3 and not train & test and train | test == {p.absolute() for p in images}
    assert (first.train, first.test) == (again.train, again.test)
    assert {s.image for s in other.test} != test  # the seed decides (true for seeds 7 and 8 on these names)
    assert not first.has_masks and all(s.label == 0 for s in first.test)


def test_folder_with_abnormal_masks_and_normal_test_dir(tmp_path: Path) -> None:
    folder_of_images(tmp_path / "normal", 4)
    folder_of_images(tmp_path / "normal_test", 2)
    bad = folder_of_images(tmp_path / "scratch", 2)
    write_mask(tmp_path / "masks" / f"{bad[0].stem}.png", np.ones((SIZE, SIZE), bool))
    write_mask(tmp_path / "masks" / f"{bad[1].stem}_mask.bmp", np.ones((SIZE, SIZE), bool))
    dataset = Folder(
        normal_dir=str(tmp_path / "normal"),
        abnormal_dir=str(tmp_path / "scratch"),
        mask_dir=str(tmp_path / "masks"),
        normal_test_dir=str(tmp_path / "normal_test"),
        image_size=SIZE,
    )
    assert dataset.has_masks and len(dataset.train) == 4 and [s.label for s in dataset.test] == [0, 0, 1, 1]
    assert [s.mask.name for s in dataset.test if s.label] == [f"{bad[0].stem}.png", f"{bad[1].stem}_mask.bmp"]
    assert dataset.defects == ["scratch"] and int(dataset.test_set()[3]["mask"].sum()) == SIZE * SIZE


def test_folder_errors_name_the_key(tmp_path: Path) -> None:
    folder_of_images(tmp_path / "normal", 3)
    folder_of_images(tmp_path / "bad", 2)
    (tmp_path / "empty_masks").mkdir()
    write_mask(tmp_path / "masks" / "img00_mask.png", np.ones((SIZE, SIZE), bool))
    normal = str(tmp_path / "normal")
    with pytest.raises(ADError, match="dataset.normal_dir"):
        Folder(normal_dir=str(tmp_path / "missing"))
    with pytest.raises(ADError, match="dataset.test_split_ratio"):
        Folder(normal_dir=normal, test_split_ratio=1.5)
    with pytest.raises(ADError, match="dataset.abnormal_dir"):
        Folder(normal_dir=normal, mask_dir=str(tmp_path / "masks"))
    with pytest.raises(ADError, match="dataset.mask_dir"):
        Folder(normal_dir=normal, abnormal_dir=str(tmp_path / "bad"), mask_dir=str(tmp_path / "empty_masks"))
    with pytest.raises(ADError, match=r"dataset\.mask_dir: no mask for .*img01\.png"):
        Folder(normal_dir=normal, abnormal_dir=str(tmp_path / "bad"), mask_dir=str(tmp_path / "masks"))


# ---------------------------------------------------------------- Synthetic


def test_synthetic_generation_is_deterministic(tmp_path: Path) -> None:
    kwargs = dict(category="brick", n_train=3, n_test_good=2, n_test_defect=5, image_size=SIZE, seed=3)
    first = make_mvtec_layout(tmp_path / "a", **kwargs)
    second = make_mvtec_layout(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png")) and len(files) == 3 + 2 + 5 + 5
    assert all(np.array_equal(read_image(first / f), read_image(second / f)) for f in files)
    different = make_mvtec_layout(tmp_path / "c", **{**kwargs, "seed": 4})
    assert not np.array_equal(read_image(first / files[-1]), read_image(different / files[-1]))


def test_synthetic_is_cached_and_reused(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(category="grass", image_size=SIZE, n_train=2, n_test_good=1, n_test_defect=5)
    dataset = Synthetic(**settings)
    assert dataset.name == "synthetic" and dataset.has_masks and len(dataset.train) == 2 and len(dataset.test) == 6
    assert dataset.train[0].image.is_relative_to(isolated_cache / "synthetic")
    generated = sorted(p.name for p in (isolated_cache / "synthetic").iterdir())
    assert len(generated) == 1 and generated[0].startswith(synthetic.SYNTHETIC_VERSION + "-")
    assert not [p for p in (isolated_cache / "synthetic" / generated[0]).iterdir() if p.name.startswith(".")]

    def must_not_generate(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached dataset was regenerated")

    monkeypatch.setattr(synthetic, "make_mvtec_layout", must_not_generate)
    again = Synthetic(**settings)
    assert again.test == dataset.test and again.fingerprint() == dataset.fingerprint()
    with pytest.raises(AssertionError):
        Synthetic(**{**settings, "seed": 1})  # other settings, other folder: generated anew


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_layout = synthetic.make_mvtec_layout

    def interrupted(root: Path, **settings: object) -> None:
        real_layout(root, **{**settings, "n_test_defect": 0})
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_mvtec_layout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Synthetic(image_size=SIZE, n_train=2, n_test_good=1, n_test_defect=1, root=str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_losing_a_generation_race_reuses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(category="gravel", image_size=SIZE, n_train=2, n_test_good=1, n_test_defect=1)
    Synthetic(**settings, root=str(tmp_path / "winner"))
    real_replace = os.replace

    def other_run_finishes_first(source: Path, target: Path) -> None:
        shutil.copytree(tmp_path / "winner" / "gravel", target)
        real_replace(source, target)  # fails: the target is a non-empty folder now

    monkeypatch.setattr(synthetic.os, "replace", other_run_finishes_first)
    dataset = Synthetic(**settings, root=str(tmp_path / "loser"))
    assert len(dataset.test) == 2 and [p.name for p in (tmp_path / "loser").iterdir()] == ["gravel"]


def test_make_mvtec_layout_accepts_any_category_name(tmp_path: Path) -> None:
    folder = make_mvtec_layout(tmp_path, "widget", n_train=2, n_test_good=1, n_test_defect=2, image_size=SIZE)
    dataset = MVTecAD(root=str(tmp_path), category="widget", image_size=SIZE)
    assert folder == tmp_path / "widget" and len(dataset.train) == 2 and len(dataset.test) == 3


def test_synthetic_explicit_root_guards_against_other_settings(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    Synthetic(category="tissue", image_size=SIZE, n_train=2, n_test_good=1, n_test_defect=1, root=str(root))
    assert (root / "tissue" / "train" / "good").is_dir()
    with pytest.raises(ADError, match=r"dataset\.root: .*n_train 2 -> 3"):
        Synthetic(category="tissue", image_size=SIZE, n_train=3, n_test_good=1, n_test_defect=1, root=str(root))


def test_synthetic_bad_settings() -> None:
    with pytest.raises(ADError, match=r"dataset\.category: .*'marble'.*available: brick, grass, gravel, tissue"):
        Synthetic(category="marble")
    with pytest.raises(ADError, match="dataset.n_train"):
        Synthetic(n_train=0)
    with pytest.raises(ADError, match="dataset.n_test_good"):
        Synthetic(n_test_good=0, n_test_defect=0)


def test_fingerprint_tracks_files_and_settings(mvtec_copy: Path) -> None:
    dataset = MVTecAD(root=str(mvtec_copy), category="gravel", image_size=SIZE)
    before = dataset.fingerprint()
    assert before == MVTecAD(root=str(mvtec_copy), category="gravel", image_size=SIZE).fingerprint()
    assert before != MVTecAD(root=str(mvtec_copy), category="gravel", image_size=SIZE + 1).fingerprint()
    os.utime(dataset.test[-1].mask, ns=(1, 1))  # a rewritten mask must invalidate cached results
    assert dataset.fingerprint() != before


# ---------------------------------------------------------------- Hydra configs


@pytest.mark.parametrize("name", ["synthetic", "mvtec", "folder"])
def test_configs_point_at_the_classes(name: str) -> None:
    config = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert config.image_size == 256 and config._target_.startswith("ad.data.")
    assert config._target_.rsplit(".", 1)[1] in {"Synthetic", "MVTecAD", "Folder"}


def test_synthetic_config_instantiates(tmp_path: Path) -> None:
    config = OmegaConf.load(CONF_DIR / "synthetic.yaml")
    overrides = OmegaConf.create({"image_size": SIZE, "n_train": 2, "n_test_good": 1, "n_test_defect": 1, "seed": 0})
    dataset = instantiate(OmegaConf.merge(config, overrides))
    assert isinstance(dataset, Synthetic) and dataset.category == config.category and dataset.image_size == SIZE


def test_folder_config_requires_normal_dir() -> None:
    with pytest.raises(Exception, match="normal_dir"):
        instantiate(OmegaConf.merge(OmegaConf.load(CONF_DIR / "folder.yaml"), {"seed": 0}))


def test_sample_is_frozen() -> None:
    sample = Sample(image=Path("a.png"), label=0, defect="good")
    with pytest.raises(AttributeError):
        sample.label = 1  # type: ignore[misc]


def test_batch_normalisation_matches_per_image_and_collates_channels_last() -> None:
    from ad.data import collate, normalize_batch

    pixels = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    batch = normalize_batch(pixels)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([normalize(image) for image in pixels]))  # the same floats
    items = [{"image": batch[i], "label": torch.tensor(i)} for i in range(3)]
    collated = collate(items)
    assert collated["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(collated["image"], batch) and collated["label"].tolist() == [0, 1, 2]


def test_collate_stacks_images_in_order_whatever_their_layout() -> None:
    from ad.data import collate, normalize_batch

    batch = normalize_batch(np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    out_of_order, one_copied = [batch[2], batch[0], batch[1]], [batch[0], batch[1].clone(), batch[2]]
    for images in (out_of_order, one_copied, [image.contiguous() for image in batch]):
        collated = collate([{"image": image, "label": torch.tensor(0)} for image in images])
        assert torch.equal(collated["image"], torch.stack(images))
        assert all(collated["image"].data_ptr() != image.data_ptr() for image in images)
    # items from the dataset, read one by one (NCHW) and as a batch (a view of one tensor)
    dataset_batch = normalize_batch(np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert torch.equal(collate([{"image": dataset_batch[0]}, {"image": dataset_batch[1]}])["image"], dataset_batch)
