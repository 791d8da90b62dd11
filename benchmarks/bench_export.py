"""Exported detectors against the torch path: torch eager, ONNX Runtime and OpenVINO side by side, batch 1 and 32.

    python benchmarks/bench_export.py                      # PaDiM resnet18, 256 px
    python benchmarks/bench_export.py --methods padim,patchcore --out export.json

Per method: one run is fitted on the built-in synthetic dataset (random backbone weights, nothing is
downloaded; untimed) and exported to ONNX and OpenVINO (export time reported). Then, on the same
uint8 images at batch 1 and 32, interleaved so background load hits every column alike, after a
warm-up: ``ad.predict.score_images`` on the bundle as the run left it (its backbone in bf16 where the
CPU runs bf16 faster, else fp32), the same in fp32 (what the exported files compute), and each
exported file through ``ad.export.runtime`` (normalisation, model, maps, thresholds). The floor of each
runtime is the backbone alone (the same layers, fp32) in that runtime. Medians over the repeats;
images/s and latency per batch. The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: Settings of each benchmarked method: its paper backbone and the layers the floor runs.
METHODS = {"padim": ["model=padim", "backbone=resnet18"], "patchcore": ["model=patchcore", "backbone=wide_resnet50_2"]}
BATCHES = (1, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="padim", help="comma-separated: padim, patchcore (default padim)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=20, help="good training images of the fitted run")
    parser.add_argument("--latency-repeat", type=int, default=15, help="batch-1 timings per column")
    parser.add_argument("--batch-repeat", type=int, default=3, help="batch-32 timings per column")
    parser.add_argument("--out", help="also write the results as JSON here")
    return parser.parse_args(argv)


def fit(method: str, size: int, n_train: int, run_dir: Path) -> None:
    """A fitted run of ``method`` on the synthetic dataset (the bundle lands in ``run_dir/model``)."""
    from hydra import compose, initialize_config_dir

    from ad.launch import CONF_DIR
    from ad.run import run

    overrides = [*METHODS[method], f"dataset.image_size={size}", "backbone.weights=random", "tracking=none",
                 f"dataset.n_train={n_train}", "dataset.n_test_good=16", "dataset.n_test_defect=16"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=overrides), run_dir)


def floor_files(bundle, folder: Path) -> dict[str, object]:
    """The bundle's backbone alone (fp32, uint8 input normalised inside) as ONNX and OpenVINO, ready to run."""
    import onnxruntime as ort
    import openvino as ov

    from ad.backbone import FeatureExtractor
    from ad.data.tensors import normalize_batch
    from ad.export.detector import Detector

    class Floor(Detector):
        """The backbone alone behind the detector's normalisation."""

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.scorer(self.normalize(images)))

    extractor = next(m for m in bundle.model.modules() if isinstance(m, FeatureExtractor))
    module = Floor(extractor, bundle.meta["preprocessing"], None, None, False).eval()
    path = folder / "floor.onnx"
    example = torch.zeros(2, bundle.image_size, bundle.image_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    def torch_floor(x: np.ndarray) -> None:
        with torch.inference_mode():
            extractor(normalize_batch(x))

    return {"torch floor (fp32)": torch_floor, "onnxruntime floor": lambda x: session.run(None, {"images": x}),
            "openvino floor": lambda x: compiled(x)}


def timed(fn, images: np.ndarray) -> float:
    start = time.perf_counter()
    fn(images)
    return time.perf_counter() - start


def bench_method(method: str, args: argparse.Namespace, scratch: Path) -> dict:
    from ad.bundle import load_bundle
    from ad.data.io import read_image
    from ad.export.export import export_bundle
    from ad.export.runtime import load_exported
    from ad.export.scorers import in_fp32
    from ad.predict import score_images
    from ad.predictions import read_predictions

    run_dir = scratch / method
    fit(method, args.image_size, args.n_train, run_dir)
    export_s, files = {}, {}
    for fmt, name in (("onnx", "d.onnx"), ("openvino", "d.xml")):
        start = time.perf_counter()
        files[fmt] = export_bundle(run_dir, fmt, scratch / f"{method}-{name}").path
        export_s[fmt] = time.perf_counter() - start
    rows = read_predictions(run_dir / "predictions.csv")
    as_run, fp32 = load_bundle(run_dir), load_bundle(run_dir)
    in_fp32(fp32.model)
    images = np.stack([read_image(Path(row["path"]), as_run.image_size) for row in rows])[:32]
    cpu = torch.device("cpu")
    columns = {
        f"torch eager ({as_run.meta['precision']})": lambda x: score_images(as_run, x, cpu),
        "torch eager (fp32)": lambda x: score_images(fp32, x, cpu),
        "onnxruntime": load_exported(files["onnx"]).score,
        "openvino": load_exported(files["openvino"]).score,
        **floor_files(fp32, scratch),
    }
    results = {"export_s": export_s, "batches": {}}
    for batch, repeat in zip(BATCHES, (args.latency_repeat, args.batch_repeat), strict=True):
        chunks = [images[i % len(images):i % len(images) + batch] for i in range(repeat)]
        for fn in columns.values():  # warm-up: first-call allocations, OpenVINO's and ORT's lazy init
            fn(chunks[0])
        times: dict[str, list[float]] = {name: [] for name in columns}
        for chunk in chunks:
            for name, fn in columns.items():  # interleaved: load hits every column alike
                times[name].append(timed(fn, chunk))
        results["batches"][batch] = {name: statistics.median(t) for name, t in times.items()}
    return results


def print_table(method: str, results: dict) -> None:
    print(f"\n{method}: export {results['export_s']['onnx']:.1f} s (ONNX), {results['export_s']['openvino']:.1f} s "
          f"(OpenVINO)")
    print("| runtime | batch 1 latency (ms) | batch 1 images/s | batch 32 latency (ms) | batch 32 images/s |")
    print("|---|---|---|---|---|")
    for name in results["batches"][1]:
        one, many = results["batches"][1][name], results["batches"][32][name]
        print(f"| {name} | {one * 1e3:.1f} | {1 / one:.1f} | {many * 1e3:.0f} | {32 / many:.1f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: --methods: {unknown} not among {list(METHODS)}", file=sys.stderr)
        return 2
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}", file=sys.stderr)
    everything = {}
    with tempfile.TemporaryDirectory(prefix="ad-bench-export-") as scratch:
        for method in methods:
            everything[method] = bench_method(method, args, Path(scratch))
            print_table(method, everything[method])
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
