"""Exported detectors against the torch path and anomalib's export: batch 1 and 32, each beside its runtime's floor.

    python benchmarks/bench_export.py                                  # PaDiM resnet18 and PatchCore wide_resnet50_2
    python benchmarks/bench_export.py --methods padim --anomalib-python /tmp/anomalib-venv/bin/python --out e.json

Per method, on one generated MVTec-layout category (``--n-train`` good training images, 16 good and
16 defective test images, 256 px PNG, kept under ``--data-dir``) with one randomly initialised timm
state dict of its backbone (kept there too; nothing is downloaded): a run is fitted (untimed) and
exported to ONNX, OpenVINO and OpenVINO int8 (calibrated on the training images; its image AUROC
against the fp32 file on the test images is reported). Then, on the same uint8 images at batch 1
and 32, interleaved so background load hits every column alike, after a warm-up:
``ad.predict.score_images`` on the bundle as the run left it (its backbone in bf16 where the CPU
runs bf16 faster, else fp32) and in fp32 (what the exported files compute), and each exported file
through ``ad.export.runtime`` (normalisation, model, maps, thresholds). The floor of each runtime is
the backbone alone (the same layers, fp32; int8 for the int8 file, quantised on the same images) in
that runtime. With ``--anomalib-python``, anomalib's own fit and ``engine.export(export_type=
"openvino")`` of the same method on the same images and weights (``anomalib_export.py``, run under
that Python) gives an IR that is timed here beside ours (its compiled model on the same images,
converted to the float NCHW input its inferencer feeds it; OpenVINO's default precision and f32),
and anomalib's ``OpenVINOInferencer`` is timed at batch 1 in anomalib's process. Medians over the
repeats; images/s and latency per batch; CPU seconds (user + sys) of this process per column; the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
#: Each benchmarked method: its paper backbone (anomalib's default for it too).
METHODS = {"padim": "resnet18", "patchcore": "wide_resnet50_2"}
CATEGORY = "bottle"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="padim,patchcore", help="comma-separated: padim, patchcore")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=20, help="good training images of the fitted run")
    parser.add_argument("--batches", default="1,32", help="batch sizes timed (default 1,32; the first one is the "
                        "latency batch)")
    parser.add_argument("--latency-repeat", type=int, default=15, help="timings per column at the first batch size")
    parser.add_argument("--batch-repeat", type=int, default=3, help="timings per column at the other batch sizes")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ad-bench-data"),
                        help="where the generated category and the weights files are kept between runs")
    parser.add_argument("--anomalib-python", help="anomalib's Python: adds its OpenVINO export beside ours")
    parser.add_argument("--out", help="also write the results as JSON here")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def dataset(args: argparse.Namespace) -> Path:
    """The generated category's root (made once and kept)."""
    from ad.data import make_mvtec_layout

    root = Path(args.data_dir).expanduser() / f"export-{args.n_train}-{args.image_size}"
    if not (root / CATEGORY / "test").is_dir():
        make_mvtec_layout(root, CATEGORY, n_train=args.n_train, n_test_good=16, n_test_defect=16,
                          image_size=args.image_size)
    return root


def fit(method: str, root: Path, weights: Path, size: int, run_dir: Path) -> None:
    """A fitted run of ``method`` on the category (the bundle lands in ``run_dir/model``)."""
    from hydra import compose, initialize_config_dir

    from ad.launch import CONF_DIR
    from ad.run import run

    overrides = [f"model={method}", f"backbone={METHODS[method]}", "dataset=mvtec", f"dataset.root={root}",
                 f"dataset.category={CATEGORY}", f"dataset.image_size={size}", f"backbone.weights={weights}",
                 "tracking=none"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=overrides), run_dir)


def floor_columns(bundle, folder: Path, calibration: list[np.ndarray]) -> dict[str, object]:
    """The bundle's backbone alone (uint8 input normalised inside) in torch, ONNX Runtime, OpenVINO fp32 and int8."""
    import onnxruntime as ort
    import openvino as ov

    from ad.backbone import FeatureExtractor
    from ad.data.tensors import normalize_batch
    from ad.export.detector import Detector
    from ad.export.int8 import SUBSET, import_nncf

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
    core, f32 = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(ov.convert_model(str(path)), "CPU", f32)
    nncf = import_nncf()
    quantised = nncf.quantize(ov.convert_model(str(path)), nncf.Dataset(calibration),
                              subset_size=min(len(calibration), SUBSET))
    compiled_int8 = core.compile_model(quantised, "CPU", f32)

    def torch_floor(x: np.ndarray) -> None:
        with torch.inference_mode():
            extractor(normalize_batch(x))

    return {"torch floor (fp32)": torch_floor, "onnxruntime floor": lambda x: session.run(None, {"images": x}),
            "openvino floor": lambda x: compiled(x), "openvino int8 floor": lambda x: compiled_int8(x)}


def anomalib_columns(xml: str) -> tuple[dict[str, object], bool]:
    """anomalib's exported IR compiled here as its inferencer compiles it (default precision) and in f32,
    fed what its ``pre_process`` makes of uint8 images; and whether its batch dimension is dynamic."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml)
    shape = model.input(0).get_partial_shape()
    dynamic = shape[0].is_dynamic
    name = model.input(0).get_any_name()
    # anomalib 2.7's PatchCore IR comes with a fixed batch of 2 (baked into its upsampling; it cannot be
    # reshaped): one image is then scored as a batch padded with copies of it, which is what it costs.
    fixed = None if dynamic else shape[0].get_length()
    default = core.compile_model(model, "CPU")
    f32 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def feed(compiled):
        def run(x: np.ndarray):
            if fixed is not None and len(x) < fixed:
                x = np.concatenate([x, np.repeat(x[:1], fixed - len(x), axis=0)])
            return compiled({name: (x.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2)})

        return run

    label = "" if fixed in (None, 1) else f", fixed batch {fixed} padded"
    return {f"anomalib openvino (default precision{label})": feed(default),
            f"anomalib openvino (f32{label})": feed(f32)}, dynamic


def run_anomalib(python: str, method: str, root: Path, weights: Path, size: int, scratch: Path,
                 repeat: int) -> dict:
    """``anomalib_export.py`` under anomalib's Python: its fit, export and inferencer timings (JSON)."""
    out = scratch / f"anomalib-{method}.json"
    command = [python, str(HERE / "anomalib_export.py"), "--model", method, "--root", str(root),
               "--category", CATEGORY, "--image-size", str(size), "--weights", str(weights),
               "--export-dir", str(scratch / f"anomalib-{method}"), "--repeat", str(repeat), "--out", str(out)]
    with open(scratch / f"anomalib-{method}.log", "w") as log:
        subprocess.run(command, cwd=scratch, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(out.read_text())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, images: np.ndarray) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn(images)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bench_method(method: str, args: argparse.Namespace, scratch: Path) -> dict:
    from bench_methods import shared_weights

    from ad.bundle import load_bundle
    from ad.data.io import read_image
    from ad.export.export import export_bundle
    from ad.export.int8 import batches
    from ad.export.runtime import load_exported
    from ad.export.scorers import in_fp32
    from ad.predict import score_images
    from ad.predictions import read_predictions

    root = dataset(args)
    weights = shared_weights(METHODS[method], Path(args.data_dir).expanduser() / "weights")
    run_dir = scratch / method
    progress(f"{method}: fitting")
    fit(method, root, weights, args.image_size, run_dir)
    train = root / CATEGORY / "train" / "good"
    export_s, files = {}, {}
    for key, fmt, name, int8 in (("onnx", "onnx", "d.onnx", False), ("openvino", "openvino", "d.xml", False),
                                 ("openvino int8", "openvino", "d-int8.xml", True)):
        progress(f"{method}: exporting {key}")
        start = time.perf_counter()
        done = export_bundle(run_dir, fmt, scratch / f"{method}-{name}", int8=int8, calibration=train if int8 else None)
        export_s[key], files[key] = time.perf_counter() - start, done.path
        if int8:
            q = done.quantised
            int8_auroc = {"fp32": q.auroc_fp32, "int8": q.auroc_int8, "test_images": q.test_images,
                          "calibration_images": q.calibration_images}
    rows = read_predictions(run_dir / "predictions.csv")
    as_run, fp32 = load_bundle(run_dir), load_bundle(run_dir)
    in_fp32(fp32.model)
    images = np.stack([read_image(Path(row["path"]), as_run.image_size) for row in rows])[:32]
    cpu = torch.device("cpu")
    calibration = batches(np.stack([read_image(p, as_run.image_size) for p in sorted(train.glob("*.png"))]),
                          None, "uint8")
    columns = {
        f"torch eager ({as_run.meta['precision']})": lambda x: score_images(as_run, x, cpu),
        "torch eager (fp32)": lambda x: score_images(fp32, x, cpu),
        "onnxruntime": load_exported(files["onnx"]).score,
        "openvino": load_exported(files["openvino"]).score,
        "openvino int8": load_exported(files["openvino int8"]).score,
        **floor_columns(fp32, scratch, calibration),
    }
    results = {"export_s": export_s, "int8_image_auroc": int8_auroc, "bank_rows": None, "batches": {},
               "cpu_s": {}, "load_before": os.getloadavg()}
    if method == "patchcore":
        results["bank_rows"] = int(as_run.model.memory_bank.shape[0])
    only_batch1: set[str] = set()
    if args.anomalib_python:
        progress(f"{method}: anomalib fit, export and inferencer timing")
        found = run_anomalib(args.anomalib_python, method, root, weights, args.image_size, scratch,
                             args.latency_repeat)
        results["anomalib"] = found
        extra, dynamic = anomalib_columns(found["xml"])
        columns.update(extra)
        only_batch1 = set() if dynamic else set(extra)
    sizes = [int(b) for b in args.batches.split(",")]
    for batch, repeat in zip(sizes, [args.latency_repeat] + [args.batch_repeat] * (len(sizes) - 1), strict=True):
        progress(f"{method}: timing batch {batch}")
        chunks = [images[i % len(images):i % len(images) + batch] for i in range(repeat)]
        chosen = {name: fn for name, fn in columns.items() if batch == 1 or name not in only_batch1}
        for fn in chosen.values():  # warm-up: first-call allocations, OpenVINO's and ORT's lazy init
            fn(chunks[0])
        walls: dict[str, list[float]] = {name: [] for name in chosen}
        cpus: dict[str, list[float]] = {name: [] for name in chosen}
        for chunk in chunks:
            for name, fn in chosen.items():  # interleaved: load hits every column alike
                wall, used = timed(fn, chunk)
                walls[name].append(wall)
                cpus[name].append(used)
        results["batches"][batch] = {name: statistics.median(t) for name, t in walls.items()}
        results["cpu_s"][batch] = {name: statistics.median(t) for name, t in cpus.items()}
    results["load_after"] = os.getloadavg()
    return results


def print_table(method: str, r: dict) -> None:
    exports = ", ".join(f"{name} {s:.0f} s" for name, s in r["export_s"].items())
    q = r["int8_image_auroc"]
    bank = f"; memory bank {r['bank_rows']} rows" if r["bank_rows"] else ""
    print(f"\n{method}: export {exports}; int8 image AUROC {q['int8']:.4f} against fp32 {q['fp32']:.4f} on "
          f"{q['test_images']} test images ({q['calibration_images']} calibration images){bank}; load average "
          f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after")
    print("| runtime | batch 1 latency (ms) | batch 1 images/s | batch 1 CPU ms | batch 32 latency (ms) "
          "| batch 32 images/s | batch 32 CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, one in r["batches"][1].items():
        many, cpu_many = r["batches"].get(32, {}).get(name), r["cpu_s"].get(32, {}).get(name)
        tail = "| | |" if many is None else f"| {many * 1e3:.0f} | {32 / many:.1f} | {cpu_many:.1f} |"
        print(f"| {name} | {one * 1e3:.1f} | {1 / one:.1f} | {r['cpu_s'][1][name] * 1e3:.0f} {tail}")
    one = r["batches"][1]
    for runtime in ("onnxruntime", "openvino", "openvino int8"):
        print(f"{runtime} at batch 1: {one[runtime] / one[runtime + ' floor']:.2f}x its floor, "
              f"{one[runtime] / one[next(k for k in one if k.startswith('torch eager'))]:.2f}x the torch path")
    if "anomalib" in r:
        a = r["anomalib"]
        inferencer = ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in a["batch1_s"].items())
        if a.get("inferencer_error"):
            inferencer = (f"its inferencer failed on one image (IR input {a.get('ir_input_shape')}): "
                          f"{a['inferencer_error']}")
        print(f"anomalib {a['versions']['anomalib']}: export {a['export_s']:.0f} s; in its own process at batch 1: "
              f"{inferencer} (load {a['load_average'][0]:.1f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: --methods: {unknown} not among {list(METHODS)}", file=sys.stderr)
        return 2
    progress(f"torch threads {torch.get_num_threads()}")
    everything = {}
    with tempfile.TemporaryDirectory(prefix="ad-bench-export-") as scratch:
        for method in methods:
            everything[method] = bench_method(method, args, Path(scratch))
            print_table(method, everything[method])
            if args.out:
                Path(args.out).write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
