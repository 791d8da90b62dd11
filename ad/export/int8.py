"""int8 post-training quantisation of an exported OpenVINO detector with NNCF, and the image AUROC it costs.

Only the convolutions and matrix products inside the pretrained backbone (the model's ``FeatureExtractor``)
are quantised: they hold nearly all of the arithmetic, and int8 features keep their ranking. Everything
after them stays fp32 (normalisation, PaDiM's Mahalanobis distances, PatchCore's k-NN product with the
memory bank, CFlow's flows, DFM's and DFKDE's projections, the map blur and the thresholds), because the
score is a small difference between distances that int8 rounding would swamp; NNCF's ignored scope (a
pattern on the graph's node names) keeps them out. Activation ranges are calibrated on good training
images, and the int8 file is then compared with the fp32 one on the run's labelled test images.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ad.errors import ADError, one_line

#: Largest image AUROC the int8 file may lose against the fp32 one before the export is refused.
MAX_DROP = 0.01
#: Most calibration images NNCF's statistics see (its own default subset size).
SUBSET = 300


class AccuracyDrop(ADError):
    """The int8 detector loses more image AUROC than ``MAX_DROP``: exit status 1, nothing written."""

    exit_status = 1


@dataclass
class Quantised:
    """What quantising cost: calibration images, and the image AUROC of both files on the run's test images."""

    calibration_images: int
    test_images: int = 0
    auroc_fp32: float | None = None
    auroc_int8: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        """fp32 AUROC minus int8 AUROC (positive: int8 is worse); None where it could not be measured."""
        return None if self.auroc_fp32 is None else self.auroc_fp32 - self.auroc_int8

    def metadata(self) -> dict[str, str]:
        """The file's metadata additions (strings, as both formats store them)."""
        measured = self.auroc_fp32 is not None
        return {"precision": "int8", "calibration_images": str(self.calibration_images),
                "image_auroc_fp32": repr(self.auroc_fp32) if measured else "",
                "image_auroc_int8": repr(self.auroc_int8) if measured else ""}


def import_nncf():
    """NNCF, quiet: its INFO lines, and torch's note on import that no CUDA runtime is found, would bury the
    command's one line."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    nncf.set_log_level(logging.WARNING)
    return nncf


def ignored_scope(backbones: tuple[str, ...]):
    """Every node outside the backbone modules named ``backbones`` (their graph scopes are ``/<name>/``)."""
    nncf = import_nncf()
    return nncf.IgnoredScope(patterns=[rf"^(?!.*/({'|'.join(backbones)})/).*$"], validate=False)


def calibration_paths(bundle_folder: Path, meta: dict, calibration: Path | None) -> tuple[list[Path], list[str]]:
    """The good images to calibrate on: ``calibration`` (a folder or file), else the run's training split
    rebuilt from its saved config (``<run>/.hydra/config.yaml``); and any warnings."""
    from ad.predict import expand_inputs

    if calibration is not None:
        return expand_inputs([str(calibration)]), []
    config = bundle_folder.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ADError(f"{bundle_folder.parent}: cannot find the run's training images to calibrate on ({config} "
                      "is missing); give --calibration DIR, a folder of good images")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    try:
        dataset = instantiate(OmegaConf.load(config).dataset)
    except Exception as exc:  # noqa: BLE001 - a moved dataset fails in the dataset's own way
        raise ADError(f"{config}: cannot list the run's training images ({one_line(exc)[:200]}); "
                      "give --calibration DIR, a folder of good images") from None
    warnings = []
    if dataset.fingerprint() != meta.get("training", {}).get("fingerprint", dataset.fingerprint()):
        warnings.append(f"the run's dataset has changed since the run ({config}); calibrating on its images as "
                        "they are now")
    return [sample.image for sample in dataset.train], warnings


def read_all(paths: list[Path], size: int, what: str) -> tuple[list[Path], np.ndarray]:
    """uint8 (N, S, S, 3) images of ``paths`` that can be read (one ADError when none can)."""
    from ad.predict import read_images

    good, images, errors = read_images(paths, size)
    if not good:
        raise ADError(f"none of the {len(paths)} {what} images could be read; first error: {errors[0]}")
    return good, np.stack(images)


def batches(images: np.ndarray, batch: int | None, input_kind: str) -> list[np.ndarray]:
    """Calibration inputs: one image each (dynamic batch), or chunks of the fixed batch, the last one wrapped round."""
    pixels = images if input_kind == "uint8" else images.astype(np.float32) / np.float32(255)
    if batch is None:
        return list(pixels[:, None])
    count = -(-len(pixels) // batch)
    return list(pixels[np.arange(count * batch) % len(pixels)].reshape(count, batch, *pixels.shape[1:]))


def quantise_model(fp32_xml: Path, calibration: list[np.ndarray], backbones: tuple[str, ...]):
    """NNCF's int8 post-training quantisation of the IR at ``fp32_xml`` (its progress bars on a terminal's stderr)."""
    import openvino as ov

    nncf = import_nncf()
    model = ov.Core().read_model(str(fp32_xml))
    bars = sys.stderr if sys.stderr.isatty() else io.StringIO()  # NNCF draws them on stdout, even into a log
    with contextlib.redirect_stdout(bars):
        return nncf.quantize(model, nncf.Dataset(calibration), subset_size=min(len(calibration), SUBSET),
                             ignored_scope=ignored_scope(backbones))


def labelled_test_images(bundle_folder: Path, size: int) -> tuple[np.ndarray, np.ndarray] | str:
    """The run's labelled test images (uint8) and 0/1 labels, from its ``predictions.csv``; else why not."""
    from ad.predictions import FILE, read_predictions

    table = bundle_folder.parent / FILE
    if not table.is_file():
        return f"the run has no {FILE} beside its model/ folder"
    rows = [row for row in read_predictions(table) if row.get("target") in ("0", "1")]
    if not rows:
        return f"{table} has no labelled test images"
    labels = np.array([int(row["target"]) for row in rows])
    if labels.min() == labels.max():
        return f"{table} lists only {'anomalous' if labels[0] else 'good'} test images"
    paths = [Path(row["path"]) for row in rows]
    try:
        good, images = read_all(paths, size, "test")
    except ADError as exc:
        return str(exc)
    if len(good) < len(paths):
        return f"{len(paths) - len(good)} of the run's {len(paths)} test images cannot be read"
    return images, labels


def image_auroc(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of the exported detector at ``path`` on ``images``."""
    import torch

    from ad.export.runtime import load_exported
    from ad.metrics import image_auroc as auroc

    scores, _ = load_exported(path).score(images)
    return auroc(torch.from_numpy(np.asarray(scores, dtype=np.float32)), torch.from_numpy(labels))


def measure(result: Quantised, bundle_folder: Path, size: int, fp32_xml: Path, int8_xml: Path) -> None:
    """Fill in both files' image AUROC on the run's test images, or a warning that it could not be measured."""
    found = labelled_test_images(bundle_folder, size)
    if isinstance(found, str):
        result.warnings.append(f"the int8 file's AUROC drop could not be measured: {found}")
        return
    images, labels = found
    result.test_images = len(labels)
    result.auroc_fp32 = image_auroc(fp32_xml, images, labels)
    result.auroc_int8 = image_auroc(int8_xml, images, labels)


def check_quantisable(meta: dict) -> None:
    """Refuse, before any work, a method without a pretrained backbone (nothing here would be quantised)."""
    if meta.get("backbone") is None:
        raise ADError(f"--int8: {meta['method']['name']} has no pretrained backbone to quantise (int8 quantises "
                      "backbones only); export it without --int8")


def quantise(bundle_folder: Path, meta: dict, fp32_xml: Path, out: Path, backbones: tuple[str, ...],
             batch: int | None, input_kind: str, calibration: tuple[list[Path], list[str]], force: bool) -> Quantised:
    """Write the int8 version of the checked fp32 IR ``fp32_xml`` to ``out``, or refuse (``AccuracyDrop``).

    ``calibration`` is ``calibration_paths``' answer. The quantised model is saved beside ``fp32_xml``
    first, scored against it on the run's test images, and written to ``out`` only when the AUROC drop
    is at most ``MAX_DROP`` (or ``force``).
    """
    from ad.export.openvino_writer import read_metadata, save_ir

    paths, warnings = calibration
    if len(paths) > SUBSET:  # NNCF would see only SUBSET of them: read those, spread over the whole list
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, SUBSET).round().astype(int)]
    size = int(meta["preprocessing"]["image_size"])
    good, images = read_all(paths, size, "calibration")
    result = Quantised(calibration_images=len(good), warnings=list(warnings))
    model = quantise_model(fp32_xml, batches(images, batch, input_kind), backbones)
    metadata = read_metadata(model)
    staged = save_ir(model, fp32_xml.with_name("int8.xml"), {**metadata, **result.metadata()})
    measure(result, bundle_folder, size, fp32_xml, staged)
    if result.drop is not None and result.drop > MAX_DROP and not force:
        raise AccuracyDrop(f"int8 loses {result.drop:.3f} image AUROC on the run's {result.test_images} test images "
                           f"({result.auroc_fp32:.3f} fp32 -> {result.auroc_int8:.3f} int8; at most {MAX_DROP} "
                           "allowed); nothing written (--force writes it anyway)")
    if result.drop is not None and result.drop > MAX_DROP:
        result.warnings.append(f"int8 loses {result.drop:.3f} image AUROC (more than {MAX_DROP}); written as --force "
                               "asked")
    save_ir(model, out, {**metadata, **result.metadata()})
    return result
