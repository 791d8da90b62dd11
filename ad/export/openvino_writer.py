"""Write an OpenVINO IR (``.xml`` + ``.bin``) of an exported ONNX detector, metadata in its ``rt_info``.

OpenVINO reads the ONNX graph with its own front end (``openvino.convert_model``), so both formats
hold the same operations; weights are saved as they are (``compress_to_fp16=False``): fp32 for parity
with the bundle, or int8 where ``ad.export.int8`` quantised the backbone.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The rt_info section the metadata is kept under.
SECTION = "ad"


def write_openvino(onnx_path: Path, xml_path: Path, metadata: dict[str, str]) -> Path:
    """Convert ``onnx_path`` to ``xml_path`` and the ``.bin`` beside it (both written whole or not at all)."""
    import openvino as ov

    return save_ir(ov.convert_model(str(onnx_path)), xml_path, metadata)


def save_ir(model, xml_path: Path, metadata: dict[str, str]) -> Path:
    """Save an ``openvino.Model`` with ``metadata`` as ``xml_path`` + ``.bin``, weights as they are (no fp16).

    OpenVINO finds the weights as the ``.bin`` of the same stem, so the pair is staged under another
    stem and renamed, weights first.
    """
    import openvino as ov

    for key, value in metadata.items():
        model.set_rt_info(value, [SECTION, key])
    staging = xml_path.with_name(xml_path.stem + ".partial.xml")
    staged_bin, final_bin = staging.with_suffix(".bin"), xml_path.with_suffix(".bin")
    try:
        ov.save_model(model, str(staging), compress_to_fp16=False)
        os.replace(staged_bin, final_bin)
        os.replace(staging, xml_path)
    finally:
        staging.unlink(missing_ok=True)
        staged_bin.unlink(missing_ok=True)
    return xml_path


def read_metadata(model) -> dict[str, str]:
    """The ``ad`` metadata an ``openvino.Model`` holds (empty for an IR that ``ad`` did not write)."""
    if not model.has_rt_info([SECTION]):
        return {}
    return {key: value.astype(str) for key, value in model.get_rt_info([SECTION]).astype(dict).items()}
