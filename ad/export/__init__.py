"""Export a model bundle as a self-contained detector file (ONNX, OpenVINO IR) and run such files without torch.

``export_bundle`` (torch side) writes the file; ``load_exported`` (``ad.export.runtime``, numpy and the
runtime only) scores images with it. Nothing here is imported eagerly, so running an exported
detector never loads torch.
"""

from __future__ import annotations

__all__ = ["FORMATS", "export_bundle", "load_exported"]

FORMATS = ("onnx", "openvino")


def __getattr__(name: str):
    if name == "export_bundle":
        from ad.export.export import export_bundle

        return export_bundle
    if name == "load_exported":
        from ad.export.runtime import load_exported

        return load_exported
    raise AttributeError(f"module 'ad.export' has no attribute '{name}'")
