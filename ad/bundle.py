"""The model bundle: a fitted detector in a folder, loadable without Hydra, the run's config or pickle.

``<run_dir>/model/`` holds ``bundle.json`` (the method and its settings, backbone and weights source,
preprocessing, thresholds, the run's metrics, versions and a fingerprint of the training images) and
``model.safetensors`` (every tensor scoring needs, backbone weights included). Loading reads JSON and
raw tensors only; the one piece of code it selects is a method class of ``ad.models``, checked
against that package, so a bundle from anywhere cannot make ``ad`` run code of its choosing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import ad
from ad.errors import ADError

FORMAT = "ad-bundle"
#: Bumped when a bundle written by this version cannot be read by an older one (or the reverse).
FORMAT_VERSION = 1
METADATA = "bundle.json"
TENSORS = "model.safetensors"


@dataclass
class Bundle:
    """A loaded bundle: the ready-to-score model (eval mode) and its metadata."""

    model: torch.nn.Module
    meta: dict
    path: Path

    @property
    def image_size(self) -> int:
        return int(self.meta["preprocessing"]["image_size"])

    @property
    def image_threshold(self) -> float | None:
        found = self.meta["thresholds"].get("image")
        return None if found is None else float(found["value"])

    @property
    def pixel_threshold(self) -> float | None:
        found = self.meta["thresholds"].get("pixel")
        return None if found is None else float(found["value"])

    @property
    def produces_maps(self) -> bool:
        return bool(self.meta["produces_maps"])


def versions() -> dict[str, str]:
    """Versions of the packages whose code computes the scores (timm's from its metadata: no import)."""
    from importlib.metadata import version

    return {"ad": ad.__version__, "torch": torch.__version__.split("+")[0], "timm": version("timm")}


def method_settings(model_node) -> tuple[str, dict]:
    """The class path and resolved constructor settings of a ``model`` config node."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(model_node, resolve=True)
    return settings.pop("_target_"), settings


def run_meta(cfg, model: torch.nn.Module, model_name: str, dataset, precision: str, thresholds: tuple,
             results: dict) -> dict:
    """What a run's bundle records besides the tensors: enough to rebuild, preprocess and judge the model.

    ``thresholds`` is the (image, pixel) pair of ``ad.thresholds.Threshold`` (either may be None).
    """
    from ad.backbone import BackboneSpec
    from ad.data import IMAGENET_MEAN, IMAGENET_STD

    target, settings = method_settings(cfg.model)
    backbone = None
    if model.uses_backbone:  # GANomaly learns from pixels: no backbone to rebuild
        backbone = BackboneSpec.from_config(cfg.backbone, precision, bool(cfg.trainer.channels_last)).to_dict()
    image, pixel = thresholds
    return {
        "method": {"name": model_name, "class": target, "settings": settings},
        "backbone": backbone, "weights_source": model.weights_source, "precision": precision,
        "produces_maps": bool(model.produces_maps),
        "preprocessing": {"image_size": dataset.image_size, "resize": "bilinear, antialiased, aspect ratio not kept",
                          "color": "RGB", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "thresholds": {"image": None if image is None else image.to_dict(),
                       "pixel": None if pixel is None else pixel.to_dict()},
        "metrics": {key: value for key, value in results.items() if isinstance(value, float)},
        "training": {"dataset": results["dataset"], "category": results["category"],
                     "fingerprint": dataset.fingerprint(), "n_train": len(dataset.train),
                     "n_val": len(dataset.val), "seed": int(cfg.seed)},
    }


def save_bundle(folder: Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write ``model``'s tensors and ``meta`` into ``folder`` (replaced whole: never a half-written bundle).

    ``meta`` holds at least ``method`` (``class``, ``name``, ``settings``), ``backbone`` (the settings its
    constructor took, or None) and ``preprocessing``; the format, versions and tensor checksum are added.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(tensors, str(staging / TENSORS))
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "versions": versions(),
            "tensors": {"file": TENSORS, "sha256": sha256(staging / TENSORS)}}
    (staging / METADATA).write_text(json.dumps(full, indent=2, default=float) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_bundle(path: str | Path) -> Path:
    """The bundle folder of a run folder, of its ``model/`` folder or of ``bundle.json`` itself."""
    path = Path(path).expanduser()
    for candidate in (path, path / "model", path.parent if path.name == METADATA else None):
        if candidate is not None and (candidate / METADATA).is_file():
            return candidate
    if not path.exists():
        raise ADError(f"{path}: no such file or folder; give a run folder, its model/ folder, or an MLflow run id")
    raise ADError(f"{path}: no model bundle here ({METADATA} missing); give a run folder or its model/ folder")


def read_meta(folder: Path) -> dict:
    """The bundle's metadata, checked for format and version."""
    where = folder / METADATA
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ADError(f"{where}: not a readable bundle description ({exc}); write the bundle again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ADError(f"{where}: not an ad model bundle")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ADError(f"{where}: bundle format {meta.get('format_version')} was written by ad "
                      f"{meta.get('versions', {}).get('ad', '?')}; this ad {ad.__version__} reads format "
                      f"{FORMAT_VERSION}: use a matching ad version, or refit")
    for key in ("method", "preprocessing", "thresholds", "tensors", "produces_maps"):
        if key not in meta:
            raise ADError(f"{where}: '{key}' is missing; the bundle is incomplete, write it again")
    return meta


def method_class(path: str) -> type:
    """The method class a bundle names, accepted only from ``ad.models`` and only an AnomalyModel."""
    from ad.models.base import AnomalyModel

    module, _, name = str(path).rpartition(".")
    if module != "ad.models" and not module.startswith("ad.models."):
        raise ADError(f"bundle: method class '{path}' is not one of ad.models; the bundle was altered")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ADError(f"bundle: method class '{path}' does not exist in this ad {ad.__version__}; "
                      "use the ad version that wrote the bundle") from None
    if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
        raise ADError(f"bundle: '{path}' is not an anomaly detection method; the bundle was altered")
    return cls


def build_model(meta: dict) -> torch.nn.Module:
    """A fresh, unfitted model of the bundle's method and settings; its backbone is not loaded (random init)."""
    from ad.backbone import BackboneSpec

    settings, cls = dict(meta["method"]["settings"]), method_class(meta["method"]["class"])
    if cls.uses_backbone:
        if meta.get("backbone") is None:
            raise ADError(f"bundle: {meta['method']['class']} runs on a backbone but the bundle names none; "
                          "the bundle was altered")
        spec = BackboneSpec.of(meta["backbone"])
        settings["backbone"] = dataclasses.replace(spec, weights="random")  # the bundle's tensors replace them
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ADError(f"bundle: the settings of {meta['method']['class']} do not fit this ad "
                      f"{ad.__version__} ({exc}); use the ad version that wrote the bundle") from None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle folder (or a run folder holding one): checksum verified, tensors loaded strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = find_bundle(path)
    meta = read_meta(folder)
    name = str(meta["tensors"].get("file", TENSORS))
    if Path(name).name != name or name in ("", ".", ".."):
        raise ADError(f"{folder / METADATA}: tensors file '{name}' is not a file name in the bundle folder")
    tensors_file = folder / name
    if not tensors_file.is_file():
        raise ADError(f"{tensors_file}: missing; the bundle is incomplete, copy the whole model/ folder")
    if sha256(tensors_file) != meta["tensors"].get("sha256"):
        raise ADError(f"{tensors_file}: checksum does not match {METADATA}; the file is damaged or was altered")
    try:
        state = load_file(str(tensors_file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ADError(f"{tensors_file}: cannot read the tensors ({exc}); write the bundle again") from None
    model = build_model(meta)
    try:
        model.load_fitted_state(state)
    except RuntimeError as exc:
        raise ADError(f"{tensors_file}: tensors do not fit {meta['method']['class']} "
                      f"({str(exc).splitlines()[0]}); the bundle was written by another ad version") from None
    from ad.backbone import FeatureExtractor

    for extractor in (m for m in model.modules() if isinstance(m, FeatureExtractor)):
        extractor.weights_source = meta.get("weights_source", "unknown")  # where the run got them, not "random"
    return Bundle(model.to(device).eval(), meta, folder)
