"""From a model bundle to an exported detector file: checks, the ``Detector``, the writers, and a parity check.

Every check that needs no model runs before the bundle loads. The written file is run once by its own
runtime on the example images and compared with the same ``Detector`` in torch, so a file whose
scores differ from the bundle's is an error, not a surprise at deployment.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ad.errors import ADError
from ad.export import FORMATS
from ad.export.int8 import Quantised
from ad.export.metadata import INPUT_KINDS
from ad.export.runtime import require

#: File suffix of each format (OpenVINO writes a .bin beside the .xml).
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
#: Formats each method can be exported to, by ``bundle.json``'s method name (tested for every pair).
SUPPORTED = {name: FORMATS for name in ("padim", "patchcore", "stfpm", "reversedistillation", "dfm", "dfkde",
                                        "cflow", "ganomaly")}
#: Parity tolerances: scores relative to their size, maps relative to their range.
SCORE_RTOL, MAP_RTOL = 1e-3, 1e-3


@dataclass
class Exported:
    """What ``export_bundle`` wrote and how far its outputs are from torch's on the check images."""

    path: Path
    method: str
    outputs: list[str]
    score_error: float | None  # max |exported - torch| / max |torch score| (of the fp32 graph)
    map_error: float | None  # max |exported - torch| / torch map range
    backbones: tuple[str, ...] = ()  # the graph scopes of the model's pretrained backbones
    quantised: Quantised | None = None  # int8: calibration and the AUROC it cost


def default_out(bundle_folder: Path, method: str, fmt: str, tag: str = "") -> Path:
    """``<run folder>/export/<method><tag>.onnx`` (or ``.xml``) beside the run's ``model/`` folder."""
    return bundle_folder.parent / "export" / f"{method}{tag}{SUFFIXES[fmt]}"


def check_request(fmt: str, out: Path | None, batch: int | None, input_kind: str, int8: bool = False) -> None:
    """Refuse a bad format, output name, batch or input kind, and a missing package, before any work."""
    if fmt not in FORMATS:
        raise ADError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if int8 and fmt != "openvino":
        raise ADError(f"--int8: built for --format openvino (NNCF's quantiser), not {fmt}")
    if int8:
        require("nncf", "--int8")
    if out is not None and out.suffix != SUFFIXES[fmt]:
        raise ADError(f"--out: {out.name} must end in {SUFFIXES[fmt]} for the {fmt} format")
    if batch is not None and batch < 1:
        raise ADError(f"--batch: {batch} must be 'dynamic' or a positive number of images")
    if input_kind not in INPUT_KINDS:
        raise ADError(f"--input: '{input_kind}' is not one of {', '.join(INPUT_KINDS)}")
    require("onnx", f"{fmt} export")
    require("onnxruntime" if fmt == "onnx" else "openvino", f"{fmt} export")


def export_bundle(bundle_ref: str | Path, fmt: str, out: str | Path | None = None, batch: int | None = None,
                  input_kind: str = "uint8", verify: bool = True, int8: bool = False,
                  calibration: str | Path | None = None, force: bool = False) -> Exported:
    """Export a bundle (run folder or ``model/`` folder) as a detector file; ``batch`` None = any batch size.

    ``int8`` (OpenVINO) quantises the backbone, calibrated on ``calibration`` (a folder of good images) or the
    run's training images, and refuses the file (``ad.export.int8.AccuracyDrop``) when it loses more than
    ``MAX_DROP`` image AUROC on the run's test images, unless ``force``.
    """
    out = None if out is None else Path(out).expanduser()
    check_request(fmt, out, batch, input_kind, int8)
    from ad.bundle import find_bundle, read_meta

    folder = find_bundle(bundle_ref)
    meta = read_meta(folder)
    method = meta["method"]["name"]
    if fmt not in SUPPORTED.get(method, ()):
        formats = ", ".join(SUPPORTED.get(method, ())) or "none"
        raise ADError(f"{folder}: {method} cannot be exported to {fmt} (supported for {method}: {formats})")
    if int8:
        from ad.export.int8 import calibration_paths, check_quantisable, quantise

        check_quantisable(meta)
        images = calibration_paths(folder, meta, None if calibration is None else Path(calibration).expanduser())
    out = out or default_out(folder, method, fmt, "-int8" if int8 else "")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ADError(f"--out: cannot create {out.parent} ({exc.strerror or exc})") from None
    if not int8:
        return write_detector(folder, fmt, out, batch, input_kind, verify)
    with tempfile.TemporaryDirectory(prefix="ad-int8-") as scratch:
        done = write_detector(folder, fmt, Path(scratch) / "fp32.xml", batch, input_kind, verify)
        done.quantised = quantise(folder, meta, done.path, out, done.backbones, batch, input_kind, images, force)
    done.path = out
    return done


def write_detector(folder: Path, fmt: str, out: Path, batch: int | None, input_kind: str, verify: bool) -> Exported:
    """Build the bundle's ``Detector``, write it in ``fmt`` to ``out`` and compare the file with torch."""
    import torch

    from ad.bundle import load_bundle
    from ad.export.detector import detector_of
    from ad.export.metadata import detector_metadata
    from ad.export.onnx_writer import write_onnx
    from ad.export.openvino_writer import write_openvino

    bundle = load_bundle(folder)
    detector = detector_of(bundle, input_kind)
    metadata = detector_metadata(bundle.meta, input_kind, detector.output_names, batch)
    if fmt == "onnx":
        write_onnx(detector, bundle.image_size, out, metadata, batch)
    else:
        with tempfile.TemporaryDirectory(prefix="ad-export-") as scratch:
            onnx_path = write_onnx(detector, bundle.image_size, Path(scratch) / "detector.onnx", metadata, batch)
            write_openvino(onnx_path, out, metadata)
    score_error = map_error = None
    if verify:
        images = check_images(bundle.image_size, batch or 3)
        pixels = torch.from_numpy(images if input_kind == "uint8" else images.astype(np.float32) / np.float32(255))
        with torch.no_grad():
            expected = dict(zip(detector.output_names, (t.numpy() for t in detector(pixels)), strict=True))
        score_error, map_error = parity(expected, load_and_run(out, images))
        if score_error > SCORE_RTOL or (map_error or 0) > MAP_RTOL:
            for written in (out, out.with_suffix(".bin")) if fmt == "openvino" else (out,):
                written.unlink(missing_ok=True)
            maps = "" if map_error is None else f", maps {map_error:.2g} of their range"
            raise ADError(f"{out.name}: the exported file's outputs differ from torch's (scores {score_error:.2g} "
                          f"relative{maps}; tolerance {SCORE_RTOL:g}); not written")
    return Exported(out, bundle.meta["method"]["name"], detector.output_names, score_error, map_error,
                    backbone_scopes(detector))


def backbone_scopes(detector) -> tuple[str, ...]:
    """Attribute names of the detector's pretrained backbones: the torch exporter scopes their nodes ``/<name>/``."""
    from ad.backbone import FeatureExtractor

    return tuple(sorted({name.rsplit(".", 1)[-1] for name, module in detector.named_modules()
                         if isinstance(module, FeatureExtractor)}))


def check_images(size: int, count: int) -> np.ndarray:
    """``count`` uint8 images unlike one another (noise, flat grey, a gradient, in turn): an op that mixes
    images of a batch, or ignores one, shows in their scores."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    flat = np.full((size, size, 3), 128, dtype=np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], (size, size, 3))
    return np.stack([(noise, flat, gradient)[i % 3] for i in range(count)])


def load_and_run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    from ad.export.runtime import load_exported

    return load_exported(path).run(images)


def parity(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
    """Largest score difference relative to the largest |score|, and map difference relative to the map range."""
    scores = expected["score"].astype(np.float64)
    score_error = float(np.abs(got["score"] - scores).max() / max(np.abs(scores).max(), 1e-12))
    if "anomaly_map" not in expected:
        return score_error, None
    maps = expected["anomaly_map"].astype(np.float64)
    spread = max(float(maps.max() - maps.min()), 1e-12)
    return score_error, float(np.abs(got["anomaly_map"] - maps).max() / spread)
