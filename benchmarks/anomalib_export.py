"""Fit anomalib 2.x's PaDiM or PatchCore, export it to OpenVINO, and time anomalib's OpenVINO inferencer at batch 1.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_export.py --model padim --root DIR --category bottle \
        --weights resnet18.pth --export-dir out/ --out padim.json [--repeat 15]

Run under anomalib's own Python by ``bench_export.py --anomalib-python``. The model is anomalib's
default (PaDiM resnet18 layer1-3; PatchCore wide_resnet50_2 layer2+3, coreset 0.1) with
``pre_trained=False`` and the local timm state dict ``--weights`` loaded into its backbone (strict),
so both libraries score with the same weights; ``MVTecAD`` datamodule and
``Engine(accelerator="cpu", devices=1, logger=False)``, defaults otherwise (untimed fit).
``engine.export(model, export_type="openvino", input_size=(S, S))`` writes the IR (export seconds
reported). Then ``OpenVINOInferencer(path, device="CPU")``, as anomalib documents it, scores the
category's test images one at a time (uint8 (S, S, 3) arrays, decoded and resized beforehand, so
decoding is not timed, as in ``bench_export.py``): median seconds per image over ``--repeat``
rounds after a warm-up, with and without ``INFERENCE_PRECISION_HINT=f32`` (the inferencer's
default config lets OpenVINO pick bf16 on CPUs that have it). Writes JSON: the IR path, its
input, export seconds, the timings, the load average and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.deploy import OpenVINOInferencer  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Padim, Patchcore  # noqa: E402
from PIL import Image  # noqa: E402

#: anomalib's default backbone and layers of each model (as ``anomalib_run.py``).
MODELS = {
    "padim": (Padim, {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"]}),
    "patchcore": (Patchcore, {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="padim")
    parser.add_argument("--root", required=True, help="folder holding the MVTec-layout category")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--weights", required=True, help="local timm state dict of the model's backbone")
    parser.add_argument("--export-dir", required=True, help="where engine.export writes the IR")
    parser.add_argument("--repeat", type=int, default=15, help="timing rounds over the test images (median kept)")
    parser.add_argument("--images", type=int, default=1, help="test images per round (default 1)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    return parser.parse_args()


def load_backbone_weights(model: torch.nn.Module, path: str) -> None:
    """Copy a full timm state dict into anomalib's truncated timm feature extractor (strict)."""
    extractor = model.model.feature_extractor.feature_extractor
    wanted = extractor.state_dict().keys()
    state = torch.load(path, map_location="cpu")
    extractor.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


def test_images(root: Path, category: str, size: int, count: int) -> list[np.ndarray]:
    """The first ``count`` test images (sorted paths), RGB uint8 at ``size`` px, as ``ad`` reads them."""
    paths = sorted((root / category / "test").rglob("*.png"))[:count]
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]


def main() -> None:
    args = parse_args()
    cls, backbone = MODELS[args.model]
    model = cls(**backbone, pre_trained=False)
    load_backbone_weights(model, args.weights)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=args.export_dir)
    engine.fit(model=model, datamodule=MVTecAD(root=args.root, category=args.category))
    start = time.perf_counter()
    xml = engine.export(model=model, export_type="openvino", export_root=args.export_dir,
                        input_size=(args.image_size, args.image_size))
    export_s = time.perf_counter() - start
    images = test_images(Path(args.root), args.category, args.image_size, args.images)
    inferencers = {"anomalib inferencer (default precision)": OpenVINOInferencer(xml, device="CPU"),
                   "anomalib inferencer (f32)": OpenVINOInferencer(xml, device="CPU",
                                                                   config={"INFERENCE_PRECISION_HINT": "f32"})}
    times: dict[str, list[float]] = {name: [] for name in inferencers}
    error = None
    try:
        for inferencer in inferencers.values():  # warm-up
            inferencer.predict(images[0])
    except RuntimeError as exc:  # e.g. an IR with a fixed batch other than 1: anomalib cannot score one image
        error = str(exc).strip().splitlines()[-1][:300]
        times = {}
    for _ in range(args.repeat if error is None else 0):
        for name, inferencer in inferencers.items():  # interleaved: load hits both alike
            for image in images:
                start = time.perf_counter()
                inferencer.predict(image)
                times[name].append(time.perf_counter() - start)
    import anomalib
    import openvino

    Path(args.out).write_text(json.dumps({
        "xml": str(xml), "input": inferencers["anomalib inferencer (f32)"].input_blob.get_any_name(),
        "export_s": export_s, "batch1_s": {name: statistics.median(t) for name, t in times.items()},
        "inferencer_error": error,
        "ir_input_shape": str(inferencers["anomalib inferencer (f32)"].model.input(0).get_partial_shape()),
        "load_average": os.getloadavg(), "threads": torch.get_num_threads(),
        "versions": {"anomalib": anomalib.__version__, "openvino": openvino.__version__, "torch": torch.__version__},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
