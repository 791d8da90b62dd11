"""The built-in dataset: MVTec-layout texture images with synthetic defects, made from photographs
that scikit-image ships, so the default run needs nothing downloaded.

Good images are random crops (with flips) of one texture photograph; defective ones get one of
several realistic defects with its exact region as the ground-truth mask. Generation is deterministic
from the seed, cached on disk, and read back with the MVTec reader.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ad.cache import default_cache_dir
from ad.data.base import check_image_size
from ad.data.mvtec import GOOD, MVTecAD
from ad.errors import ADError, did_you_mean

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = "v1"  # bump whenever generation changes, so old cached datasets are not reused
DEFAULT_CATEGORY = "brick"  # structured like an industrial surface, and the easiest to separate

# category -> function of ``skimage.data`` that loads its photograph from the installed package
TEXTURES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "tissue": "immunohistochemistry",
}

CROP_FRACTION = 0.5  # a good image shows this fraction of the photograph's shorter side
SUPERSAMPLE = 4  # thin strokes are drawn this many times larger, then box-filtered, for soft edges
MARKER = "synthetic.json"  # settings a generated category was made with; its presence means "complete"

Defect = Callable[[np.ndarray, np.random.Generator, str], tuple[np.ndarray, np.ndarray]]


def check_category(category: str) -> str:
    """Return ``category`` if it is a known texture, else raise ADError listing the known ones."""
    if category not in TEXTURES:
        raise ADError(f"dataset.category: unknown synthetic texture '{category}'; "
                      f"{did_you_mean(category, TEXTURES)}available: {', '.join(TEXTURES)}")
    return category


@functools.cache
def load_photo(category: str) -> np.ndarray:
    """The texture photograph of ``category`` as read-only uint8 RGB (H, W, 3)."""
    import skimage.data  # imported here: only generation needs it, and it is slow to import

    photo = getattr(skimage.data, TEXTURES[category])()
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    photo = np.ascontiguousarray(photo[..., :3])
    photo.flags.writeable = False
    return photo


@functools.cache
def is_greyscale(category: str) -> bool:
    """Whether the photograph of ``category`` has no colour (its defects should mostly not add any)."""
    photo = load_photo(category)
    return bool((photo[..., 0] == photo[..., 1]).all() and (photo[..., 1] == photo[..., 2]).all())


def random_crop(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A randomly placed and flipped crop of the photograph, resized to float32 (size, size, 3)."""
    photo = load_photo(category)
    height, width = photo.shape[:2]
    side = round(min(height, width) * CROP_FRACTION)
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and ease in and out, for soft but bounded defect edges."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def blob_alpha(size: int, rng: np.random.Generator, radius: tuple[float, float], softness: float) -> np.ndarray:
    """Opacity (size, size) of an irregular, rotated, elongated blob at a random place.

    The outline is an ellipse whose radius wobbles with a few random angular harmonics; ``radius``
    is a range in fractions of the image side and ``softness`` the edge width in fractions of the radius.
    Opacity is 0.5 exactly on the outline.
    """
    centre_y, centre_x = rng.uniform(0.2, 0.8, 2) * size
    mean_radius = rng.uniform(*radius) * size
    aspect, angle = rng.uniform(0.5, 1.0), rng.uniform(0.0, np.pi)
    harmonics = np.arange(2, 7, dtype=np.float32)[:, None, None]
    amplitudes = rng.uniform(0.0, 0.3, (5, 1, 1)) / harmonics
    phases = rng.uniform(0.0, 2 * np.pi, (5, 1, 1))
    ys, xs = np.mgrid[:size, :size].astype(np.float32) + 0.5
    dy, dx = ys - centre_y, xs - centre_x
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = (dy * np.cos(angle) - dx * np.sin(angle)) / aspect
    outline = mean_radius * (1.0 + (amplitudes * np.sin(harmonics * np.arctan2(across, along) + phases)).sum(0))
    return smoothstep((outline - np.hypot(along, across)) / (softness * mean_radius) + 0.5).astype(np.float32)


def stroke_alpha(size: int, polylines: list[np.ndarray], width: float) -> np.ndarray:
    """Opacity (size, size) of polylines ((N, 2) x, y pixel coordinates) drawn ``width`` pixels wide."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points in polylines:
        scaled = [tuple(point) for point in (points * SUPERSAMPLE).tolist()]
        draw.line(scaled, fill=255, width=max(1, round(width * SUPERSAMPLE)), joint="curve")
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def random_walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float) -> np.ndarray:
    """Jagged path (steps + 1, 2) from ``start`` whose heading drifts randomly: the shape of a crack."""
    headings = angle + np.cumsum(rng.normal(0.0, 0.45, steps))
    lengths = step * rng.uniform(0.5, 1.5, steps)
    moves = np.stack([np.cos(headings), np.sin(headings)], axis=1) * lengths[:, None]
    return np.concatenate([start[None], start + np.cumsum(moves, axis=0)])


def blend(image: np.ndarray, alpha: np.ndarray, overlay: np.ndarray | float) -> np.ndarray:
    """``image`` with ``overlay`` laid over it at opacity ``alpha`` (H, W)."""
    return image * (1.0 - alpha[..., None]) + overlay * alpha[..., None]


def add_contamination(image: np.ndarray, rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Foreign material: a patch of another texture pasted in with a soft irregular outline."""
    size = image.shape[0]
    alpha = blob_alpha(size, rng, radius=(0.07, 0.18), softness=0.3)
    others = [name for name in TEXTURES if name != category]
    patch = random_crop(others[rng.integers(len(others))], rng, size)
    if is_greyscale(category):
        patch = patch.mean(axis=2, keepdims=True)
    return blend(image, alpha, patch), alpha


def add_crack(image: np.ndarray, rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """A dark, jagged, sometimes branching crack."""
    size = image.shape[0]
    angle = rng.uniform(0.0, 2 * np.pi)
    trunk = random_walk(rng, rng.uniform(0.25, 0.75, 2) * size, angle, int(rng.integers(8, 16)), 0.035 * size)
    paths = [trunk]
    if rng.random() < 0.6:
        fork = trunk[rng.integers(2, len(trunk) - 2)]
        paths.append(random_walk(rng, fork, angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2), 6, 0.03 * size))
    alpha = stroke_alpha(size, paths, width=max(1.0, rng.uniform(1.2, 2.5) * size / 256))
    return image * (1.0 - rng.uniform(0.6, 0.9) * alpha[..., None]), alpha


def add_hole(image: np.ndarray, rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """A small dark hole with a sharp rim, keeping a faint trace of the texture inside."""
    alpha = blob_alpha(image.shape[0], rng, radius=(0.04, 0.1), softness=0.15)
    return blend(image, alpha, image * rng.uniform(0.05, 0.25)), alpha


def add_scratch(image: np.ndarray, rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """A thin, smoothly curved scratch, usually lighter than the surface, sometimes darker."""
    size = image.shape[0]
    start = rng.uniform(0.15, 0.85, 2) * size
    angle, length = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.25, 0.6) * size
    end = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 0.02 * size, 0.98 * size)
    normal = np.array([-np.sin(angle), np.cos(angle)])
    control = (start + end) / 2 + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0.0, 1.0, 32)[:, None]
    curve = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end
    alpha = stroke_alpha(size, [curve], width=max(1.0, rng.uniform(1.5, 3.5) * size / 256))
    target = 255.0 if rng.random() < 0.7 else 0.0
    return blend(image, alpha * rng.uniform(0.4, 0.9), target), alpha


STAIN_COLOURS = np.array(
    [[170, 90, 40], [110, 70, 40], [50, 60, 140], [80, 120, 50], [225, 220, 205]], dtype=np.float32
)  # rust, coffee, ink, moss, chalk


def add_stain(image: np.ndarray, rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """A translucent, softly edged colour blotch (rust, coffee, ink, moss or chalk)."""
    alpha = blob_alpha(image.shape[0], rng, radius=(0.08, 0.2), softness=0.5)
    colour = STAIN_COLOURS[rng.integers(len(STAIN_COLOURS))]
    return blend(image, alpha * rng.uniform(0.3, 0.75), colour), alpha


DEFECTS: dict[str, Defect] = {
    "contamination": add_contamination,
    "crack": add_crack,
    "hole": add_hole,
    "scratch": add_scratch,
    "stain": add_stain,
}


def defective_image(category: str, kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A good crop with one defect of ``kind``: uint8 image and its bool mask (where opacity >= 0.5)."""
    image, alpha = DEFECTS[kind](random_crop(category, rng, size), rng, category)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), alpha >= 0.5 * alpha.max()


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write an array as PNG, creating its folder; low compression since these files are read often."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=1)


def make_mvtec_layout(
    root: str | Path,
    category: str = DEFAULT_CATEGORY,
    n_train: int = 40,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    image_size: int = 256,
    seed: int = 42,
    texture: str | None = None,
) -> Path:
    """Write a synthetic ``category`` in the MVTec AD layout under ``root`` and return its folder.

    ``category`` is the folder name and any name works (tests make a "widget"); the photograph used
    is ``texture``, else the category when it names one of ``TEXTURES``, else the default texture.
    Defect types take turns (``DEFECTS`` order) so each gets an equal share; every image has its own
    random stream derived from ``seed``, so the output depends only on the arguments.
    """
    texture = check_category(texture or (category if category in TEXTURES else DEFAULT_CATEGORY))
    category_id = zlib.crc32(category.encode())  # different categories get different crops and defect shapes
    category_dir = Path(root) / category
    (category_dir / "ground_truth").mkdir(parents=True, exist_ok=True)
    for split, (folder, count) in enumerate([("train", n_train), ("test", n_test_good)]):
        (category_dir / folder / GOOD).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = random_crop(texture, np.random.default_rng([seed, category_id, split, index]), image_size)
            save_png(image.astype(np.uint8), category_dir / folder / GOOD / f"{index:03d}.png")
    kinds = list(DEFECTS)
    for index in range(n_test_defect):
        kind, number = kinds[index % len(kinds)], index // len(kinds)
        rng = np.random.default_rng([seed, category_id, 2, index])
        image, mask = defective_image(texture, kind, rng, image_size)
        save_png(image, category_dir / "test" / kind / f"{number:03d}.png")
        save_png(mask.astype(np.uint8) * 255, category_dir / "ground_truth" / kind / f"{number:03d}_mask.png")
    return category_dir


class Synthetic(MVTecAD):
    """Built-in texture dataset, generated on first use (a few seconds) and cached, then read as MVTec AD."""

    name = "synthetic"

    def __init__(
        self,
        category: str = DEFAULT_CATEGORY,
        image_size: int = 256,
        n_train: int = 40,
        n_test_good: int = 20,
        n_test_defect: int = 20,
        seed: int = 42,
        root: str | None = None,
        categories: list[str] | None = None,
        val_ratio: float = 0.0,
    ) -> None:
        if categories is not None and category not in categories:  # the config's list, used by category=all
            valid = ", ".join(categories)
            raise ADError(f"dataset.category: '{category}' is not a category of synthetic; "
                          f"{did_you_mean(category, categories)}valid: {valid}")
        settings = {
            "category": check_category(category),
            "image_size": check_image_size(image_size),
            "n_train": check_count("dataset.n_train", n_train, minimum=1),
            "n_test_good": check_count("dataset.n_test_good", n_test_good, minimum=0),
            "n_test_defect": check_count("dataset.n_test_defect", n_test_defect, minimum=0),
            "seed": check_count("dataset.seed", seed, minimum=0),
        }
        if n_test_good + n_test_defect == 0:
            raise ADError(
                "dataset.n_test_good: with dataset.n_test_defect also 0 there is nothing to test; set one > 0"
            )
        base = Path(root).expanduser() if root is not None else default_cache_dir() / "synthetic" / cache_name(settings)
        ensure_generated(base / category, settings)
        super().__init__(root=str(base), category=category, image_size=image_size, val_ratio=val_ratio, seed=seed)


def check_count(key: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an integer of at least ``minimum``, else raise ADError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ADError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    return value


def cache_name(settings: dict) -> str:
    """Folder name for generated data: generator version and a hash of every setting."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{SYNTHETIC_VERSION}-{digest}"


def read_marker(category_dir: Path) -> dict | None:
    """Settings a finished generation left in ``category_dir``, or None if there is none."""
    try:
        return json.loads((category_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_generated(category_dir: Path, settings: dict) -> None:
    """Generate the category into ``category_dir`` unless a complete one with these settings is there.

    Generation goes to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a partial dataset, and concurrent runs simply keep the first one.
    """
    wanted = {"version": SYNTHETIC_VERSION, **settings}
    if category_dir.exists():
        check_reusable(category_dir, wanted)
        return
    category_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{category_dir.name}-", dir=category_dir.parent))
    try:
        started = time.perf_counter()
        generated = make_mvtec_layout(staging, **settings)
        (generated / MARKER).write_text(json.dumps(wanted, sort_keys=True, indent=2))
        try:
            os.replace(generated, category_dir)
        except OSError:
            if read_marker(category_dir) != wanted:  # not another run's identical result: a real error
                raise
        log.info(
            "generated synthetic %s in %.1fs at %s", settings["category"], time.perf_counter() - started, category_dir
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_reusable(category_dir: Path, wanted: dict) -> None:
    """Raise ADError unless ``category_dir`` holds a synthetic dataset made with exactly ``wanted``."""
    found = read_marker(category_dir)
    if found is None:
        raise ADError(
            f"dataset.root: '{category_dir}' exists but is not a generated synthetic dataset; "
            f"point dataset.root at a new or empty folder"
        )
    if found != wanted:
        changed = ", ".join(
            f"{key} {found.get(key)!r} -> {value!r}" for key, value in wanted.items() if found.get(key) != value
        )
        raise ADError(
            f"dataset.root: '{category_dir}' was generated with other settings ({changed}); "
            f"delete it or point dataset.root elsewhere"
        )
