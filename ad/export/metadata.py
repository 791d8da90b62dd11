"""What an exported detector file says about itself: string key/value pairs in the file's own metadata fields.

ONNX keeps them in ``metadata_props``, OpenVINO in the model's ``rt_info`` under ``ad``; the same keys
in both, so a deployment reads method, image size, thresholds and the ``ad`` version without ``ad``.
"""

from __future__ import annotations

import json

FORMAT = "ad-detector"
#: Bumped when a file written by this version cannot be run by an older runner (or the reverse).
FORMAT_VERSION = 1
#: Input pixel encodings: uint8 0..255, or float32 0..1 (as most image libraries hand them over).
INPUT_KINDS = ("uint8", "float32")


def detector_metadata(meta: dict, input_kind: str, outputs: list[str], batch: int | None) -> dict[str, str]:
    """The metadata of a detector exported from a bundle's ``meta`` (all values strings, as both formats store)."""
    from ad import __version__

    thresholds = meta["thresholds"]
    image, pixel = thresholds.get("image"), thresholds.get("pixel")
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": meta["method"]["name"],
        "method_class": meta["method"]["class"],
        "backbone": (meta.get("backbone") or {}).get("name", ""),
        "image_size": str(meta["preprocessing"]["image_size"]),
        "input": input_kind,
        "batch": "dynamic" if batch is None else str(batch),
        "image_threshold": "" if image is None else repr(float(image["value"])),
        "pixel_threshold": "" if pixel is None else repr(float(pixel["value"])),
        "produces_maps": str(bool(meta["produces_maps"])).lower(),
        "outputs": ",".join(outputs),
        "thresholds": json.dumps(thresholds),
        "ad_version": __version__,
        "bundle_sha256": meta["tensors"]["sha256"],
        "precision": "fp32",  # of the file's arithmetic; ad.export.int8 records int8
    }


def optional_float(text: str) -> float | None:
    """A threshold as stored: empty for none."""
    return None if text == "" else float(text)
