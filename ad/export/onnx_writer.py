"""Write a ``Detector`` to one ONNX file, weights and metadata included, with torch's TorchScript-based exporter.

The TorchScript exporter (``dynamo=False``) traces the module once. The dynamo exporter also exports
these graphs, but took longer on every model tried (README, Export) and needs the onnxscript package
besides. The batch dimension is symbolic (``batch=None``) or fixed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ad.export.detector import Detector

#: ONNX opset: supported by onnxruntime and OpenVINO releases from 2023 on.
OPSET = 17
#: Images in the batch the graph is traced with when the batch is dynamic (any size runs afterwards).
TRACE_BATCH = 2


def write_onnx(detector: Detector, image_size: int, path: Path, metadata: dict[str, str],
               batch: int | None = None) -> Path:
    """Export ``detector`` for (batch, S, S, 3) inputs to ``path`` (written whole or not at all)."""
    import onnx

    dtype = torch.uint8 if detector.input_kind == "uint8" else torch.float32
    example = torch.zeros(batch or TRACE_BATCH, image_size, image_size, 3, dtype=dtype)
    if dtype == torch.uint8:
        example = torch.randint(0, 256, example.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    else:
        example = torch.rand(example.shape, generator=torch.Generator().manual_seed(0))
    names = detector.output_names
    dynamic = None if batch else {name: {0: "batch"} for name in ["images", *names]}
    staging = path.with_name(path.name + ".partial")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values: the graph is checked by parity
            torch.onnx.export(detector, (example,), str(staging), dynamo=False, input_names=["images"],
                              output_names=names, dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
        graph = onnx.load(str(staging))
        graph.doc_string = (f"ad {metadata['method']} detector: (B, S, S, 3) {metadata['input']} RGB -> "
                            f"{', '.join(names)}")
        onnx.helper.set_model_props(graph, metadata)
        onnx.save(graph, str(staging))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path
