"""Run an exported detector (``.onnx`` with ONNX Runtime, ``.xml`` with OpenVINO) on numpy images, without torch.

``load_exported(path)`` reads the file's metadata and opens it on the CPU; ``.score(images)`` takes
uint8 (B, S, S, 3) RGB images at the detector's size and returns scores (B,) and maps (B, S, S) or None,
the same as ``ad.predict.score_images`` gives for the bundle. A file exported with a fixed batch is
fed chunks of that size, the last one padded (a method's scores never depend on their batch mates).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from ad.errors import ADError
from ad.export.metadata import FORMAT, FORMAT_VERSION, optional_float
from ad.export.openvino_writer import read_metadata

#: Which runtime package runs each file type, and the extra that installs it.
RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino"}
EXTRA = "pip install -e '.[export]'"


def require(module: str, purpose: str):
    """Import an optional runtime package, or one line saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ADError(f"{purpose} needs the '{module}' package, which is not installed; "
                      f"install the export extra: {EXTRA}") from None


class ExportedDetector:
    """An exported detector file opened for scoring; attributes mirror ``ad.bundle.Bundle``'s."""

    def __init__(self, path: Path, metadata: dict[str, str], run, input_shape: list) -> None:
        self.path, self.metadata, self._run = path, metadata, run
        if metadata.get("format") != FORMAT:
            raise ADError(f"{path}: not an ad detector (no '{FORMAT}' metadata); export it with python -m ad.export")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ADError(f"{path}: detector format {metadata.get('format_version')} was written by ad "
                          f"{metadata.get('ad_version', '?')}; this runner reads format {FORMAT_VERSION}: re-export it")
        self.method = metadata["method"]
        self.image_size = int(metadata["image_size"])
        self.image_threshold = optional_float(metadata["image_threshold"])
        self.pixel_threshold = optional_float(metadata["pixel_threshold"])
        self.produces_maps = metadata["produces_maps"] == "true"
        self.input_kind = metadata["input"]
        self.batch = None if metadata["batch"] == "dynamic" else int(metadata["batch"])
        self.outputs = metadata["outputs"].split(",")
        self.precision = metadata.get("precision", "fp32")  # int8: its backbone was quantised (ad.export.int8)
        self.meta = {"method": {"name": self.method}, "thresholds": json.loads(metadata["thresholds"]),
                     "produces_maps": self.produces_maps, "preprocessing": {"image_size": self.image_size}}
        self.input_shape = input_shape

    def check(self, images: np.ndarray) -> None:
        """One line when images are not (B, S, S, 3) uint8 at the detector's size."""
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ADError(f"{self.path.name}: takes RGB images of shape (B, {s}, {s}, 3), got "
                          f"{tuple(images.shape)}; resize to {s} px and give 3 channels (ad.data.io.read_image does)")
        if images.dtype != np.uint8:
            raise ADError(f"{self.path.name}: takes uint8 images (0..255), got {images.dtype}")

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph for uint8 (B, S, S, 3) images, by name."""
        self.check(images)
        pixels = images if self.input_kind == "uint8" else images.astype(np.float32) / np.float32(255)
        if self.batch is None:
            return dict(zip(self.outputs, self._run(np.ascontiguousarray(pixels)), strict=True))
        parts = []
        for start in range(0, len(pixels), self.batch):
            chunk = pixels[start:start + self.batch]
            padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            parts.append([out[:len(chunk)] for out in self._run(np.ascontiguousarray(padded))])
        return {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(self.outputs)}

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (B,) and maps (B, S, S) or None, as ``ad.predict.score_images``."""
        found = self.run(images)
        return found["score"], found.get("anomaly_map")


def open_onnx(path: Path) -> ExportedDetector:
    """An ONNX detector on ONNX Runtime's CPU provider."""
    ort = require("onnxruntime", f"running {path.name}")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
        reason = str(exc).splitlines()[0][:200]
        raise ADError(f"{path}: ONNX Runtime cannot open it ({reason}); export it again") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    names = [output.name for output in session.get_outputs()]
    return ExportedDetector(path, metadata, lambda x: session.run(names, {"images": x}),
                            session.get_inputs()[0].shape)


def open_openvino(path: Path, precision: str = "f32") -> ExportedDetector:
    """An OpenVINO IR on the CPU plugin, in fp32 (the plugin's default is bf16 on CPUs that have it)."""
    ov = require("openvino", f"running {path.name}")
    if not path.with_suffix(".bin").is_file():
        raise ADError(f"{path.with_suffix('.bin')}: missing; copy the .bin beside the .xml")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for damaged files
        raise ADError(f"{path}: OpenVINO cannot read it ({str(exc).splitlines()[0][:200]}); export it again") from None
    metadata = read_metadata(model)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    names = [output.get_any_name() for output in compiled.outputs]

    def run(x: np.ndarray) -> list[np.ndarray]:
        results = request.infer({0: x})
        return [results[name].copy() for name in names]

    return ExportedDetector(path, metadata, run, [str(d) for d in model.input(0).partial_shape])


def load_exported(path: str | Path) -> ExportedDetector:
    """Open an exported detector: ``.onnx`` (ONNX Runtime) or ``.xml`` (OpenVINO), each on the CPU."""
    path = Path(path).expanduser()
    if path.suffix not in RUNTIMES:
        raise ADError(f"{path}: not an exported detector; give a .onnx or an OpenVINO .xml file")
    if not path.is_file():
        raise ADError(f"{path}: no such file")
    return open_onnx(path) if path.suffix == ".onnx" else open_openvino(path)
