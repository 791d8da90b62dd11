"""Predict speed: ad's scoring path against its backbone floor, and ``ad.predict`` against anomalib's predict.

    python benchmarks/bench_predict.py --quick                # smoke run: PaDiM only, few images, no anomalib
    python benchmarks/bench_predict.py --anomalib-python /tmp/anomalib-venv/bin/python --out predict.json

On one generated MVTec-layout category (60 good training images and 100 test images, 50 good and
50 defective, 256 px PNG; cached under ``--data-dir``), with one randomly initialised timm state
dict per backbone loaded by both libraries (no pretrained weights are needed or downloaded):

1. **In-process**, for PaDiM resnet18 and PatchCore wide_resnet50_2 with their default settings:
   each model is fitted once by ``python -m ad.launch ... tracking=none`` (untimed), its bundle
   (``<run>/model/``) loaded once, and the 100 test images decoded and resized once. Then, at batch 1
   and batch 32, three calls are timed on the same batches, interleaved so background load hits them
   alike, after a warm-up: ``ad.predict.score_images`` on the uint8 batch (normalisation, model,
   scores and maps back as NumPy: what the command runs per batch), the bundle's model alone on the
   normalised batch, and the floor: the model's own ``FeatureExtractor`` (same weights, precision
   and memory layout) alone on that batch. Each figure is the median over the batches.
2. **Whole commands**, cold processes, wall time: ``python -m ad.predict RUN_DIR TEST_DIR --out DIR``
   against ``benchmarks/anomalib_predict.py predict`` under ``--anomalib-python`` (imports, the same
   PaDiM rebuilt, ``Engine.predict`` with the checkpoint of an anomalib PaDiM fitted once, untimed,
   on the same training images with the same weights and kept under ``--data-dir``; a CSV of path,
   score, label). Both score the
   same 100 images. Repeated ``--repeat`` times in alternating order; medians reported, with the
   load average before and after each repetition. The scores' rank correlation between the two
   libraries is printed as a sanity check (the same method on the same weights and images).

The table goes to stdout, progress to stderr, everything (every timing) to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_methods import BACKBONES, run_ad, shared_weights
from bench_padim import HERE, machine_info, prepare_data, progress, publish, timed

#: Model -> batch-1 latency / backbone floor, at most.
FLOOR_TARGETS = {"padim": 1.3}
#: ad.predict whole command / anomalib's whole predict command, at most.
ANOMALIB_TARGET = 1 / 3
BATCH_SIZES = (1, 32)
COLUMNS = ("predict", "model", "floor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="padim,patchcore", help="comma-separated: padim, patchcore")
    data = parser.add_argument_group("data (default: a generated category of 60 train + 100 test images of 256 px)")
    data.add_argument("--category", default="bottle", help="generated category folder name (default: bottle)")
    data.add_argument("--n-train", type=int, default=60, help="generated good training images (default 60)")
    data.add_argument("--n-images", type=int, default=100,
                      help="images scored: half good, half defective (default 100)")
    data.add_argument("--source-size", type=int, default=256, help="generated PNG side in px (default 256)")
    data.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ad-bench-data"),
                      help="where generated categories and weights files are kept between runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: PaDiM only, 20 train + 40 test images, few repeats, no anomalib")
    parser.add_argument("--latency-repeat", type=int, default=20, help="batch-1 timings per column (default 20)")
    parser.add_argument("--batch-repeat", type=int, default=3, help="batch-32 timings per column (default 3)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of the whole commands (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads of the in-process timings (default: torch's); "
                                                    "the commands keep their own")
    parser.add_argument("--anomalib-python", help="Python of a venv with anomalib 2.x; omitted: no command comparison")
    parser.add_argument("--anomalib-batch-size", type=int, default=32,
                        help="anomalib's predict batch size (default 32, as ad.predict's); 0: its data_path route "
                             "(batch 1)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders (printed)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in ("padim", "patchcore") for m in args.models):
        parser.error("--models: choose from padim, patchcore")
    if args.quick:
        args.models, args.n_train, args.n_images = ["padim"], 20, 40
        args.latency_repeat, args.batch_repeat, args.repeat, args.anomalib_python = 5, 1, 1, None
    if args.n_images < max(BATCH_SIZES) * args.batch_repeat or args.n_images < args.latency_repeat:
        parser.error(f"--n-images: {args.n_images} is fewer than --batch-repeat x {max(BATCH_SIZES)} "
                     "or --latency-repeat images")
    return args


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- in-process: ad's scoring path against its backbone -------------------------------------------


def scoring_calls(bundle) -> dict[str, Callable]:
    """The three timed calls on one batch (uint8 images and their normalised tensor), by column."""
    from ad.predict import score_images

    model, device = bundle.model, torch.device("cpu")

    @torch.inference_mode()
    def alone(call: Callable, tensor: torch.Tensor) -> None:
        call(tensor)

    return {"predict": lambda images, tensor: score_images(bundle, images, device),
            "model": lambda images, tensor: alone(model, tensor),
            "floor": lambda images, tensor: alone(model.extractor.compute, tensor)}


def time_batches(calls: dict[str, Callable], batches: list[np.ndarray]) -> dict[str, list[float]]:
    """Seconds of every call on every batch, after one warm-up call each; the order of the calls
    rotates from batch to batch, so that background load and cache effects hit each alike."""
    from ad.data.tensors import normalize_batch

    tensors = [normalize_batch(batch) for batch in batches]
    for call in calls.values():
        call(batches[0], tensors[0])
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i, (images, tensor) in enumerate(zip(batches, tensors, strict=True)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            calls[name](images, tensor)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def in_process(model_name: str, run_dir: Path, image_dir: Path, args: argparse.Namespace) -> dict:
    """Per-image latency and images/s of each column at each batch size, for one fitted model."""
    from ad.backbone import resolve_precision
    from ad.bundle import load_bundle
    from ad.predict import expand_inputs, read_images

    bundle = load_bundle(run_dir)
    _, images, errors = read_images(expand_inputs([str(image_dir)]), bundle.image_size)
    assert not errors, errors
    images = np.stack(images)
    extractor = bundle.model.extractor
    dtype = resolve_precision(extractor.precision, torch.device("cpu"))
    out = {"backbone": extractor.name, "layers": extractor.layers,
           "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
           "channels_last": extractor.channels_last, "batches": {}}
    calls = scoring_calls(bundle)
    for batch_size in BATCH_SIZES:
        count = args.latency_repeat if batch_size == 1 else args.batch_repeat
        batches = [images[i * batch_size:(i + 1) * batch_size] for i in range(count)]
        progress(f"{model_name}: batch {batch_size}, {count} batches x {len(calls)} calls")
        seconds = time_batches(calls, batches)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        fastest = {name: min(values) for name, values in seconds.items()}
        out["batches"][batch_size] = {
            "seconds": seconds, "load_avg": load_now(),
            "fastest_predict_over_floor": fastest["predict"] / fastest["floor"],
            **{f"{name}_ms_per_image": 1000 * medians[name] / batch_size for name in calls},
            **{f"{name}_images_per_s": batch_size / medians[name] for name in calls},
            "predict_over_floor": medians["predict"] / medians["floor"],
            "model_over_floor": medians["model"] / medians["floor"]}
    return out


# -- whole commands ---------------------------------------------------------------------------------


def fit_anomalib(python: str, root: Path, category: str, weights: Path, work: Path, keep_in: Path) -> Path:
    """anomalib's PaDiM fitted on the training images (untimed), once per category and weights file:
    the checkpoint is kept under ``keep_in`` (minutes of anomalib's fit and validation saved per run)."""
    ckpt = keep_in / f"{root.name}_{category}_padim_{weights.stem}.ckpt"
    if ckpt.exists():
        progress(f"anomalib PaDiM: reusing {ckpt}")
        return ckpt
    progress(f"fitting anomalib PaDiM once, untimed; kept as {ckpt}")
    folder = work / "anomalib-fit"
    folder.mkdir()
    partial = folder / "padim.ckpt"
    timed([python, str(HERE / "anomalib_predict.py"), "fit", "--root", str(root), "--category", category,
           "--weights", str(weights), "--ckpt", str(partial)], cwd=folder, log=work / "anomalib-fit.log")
    keep_in.mkdir(parents=True, exist_ok=True)
    shutil.move(partial, ckpt)  # under its final name only once complete
    return ckpt


def ad_command(run_dir: Path, image_dir: Path, work: Path, rep: int) -> tuple[list[str], Path]:
    out = work / f"predict-ad-{rep}"
    command = [sys.executable, "-m", "ad.predict", str(run_dir), str(image_dir), "--out", str(out)]
    return command, out / "predictions.csv"


def anomalib_command(python: str, ckpt: Path, image_dir: Path, batch_size: int, work: Path,
                     rep: int) -> tuple[list[str], Path]:
    out = work / f"predict-anomalib-{rep}.csv"
    command = [python, str(HERE / "anomalib_predict.py"), "predict", "--ckpt", str(ckpt), "--images", str(image_dir),
               "--out", str(out)]
    return command + (["--batch-size", str(batch_size)] if batch_size else []), out


def read_scores(path: Path) -> dict[str, float]:
    with path.open() as file:
        return {str(Path(row["path"]).resolve()): float(row["score"]) for row in csv.DictReader(file)}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {load_now()}"


def whole_commands(run_dir: Path, ckpt: Path, image_dir: Path, args: argparse.Namespace, work: Path) -> dict:
    """Both predict commands ``--repeat`` times, alternating which goes first; wall seconds and load."""
    runs: dict[str, list[dict]] = {"ad": [], "anomalib": []}
    outputs: dict[str, Path] = {}
    for rep in range(args.repeat):
        commands = {"ad": ad_command(run_dir, image_dir, work, rep),
                    "anomalib": anomalib_command(args.anomalib_python, ckpt, image_dir, args.anomalib_batch_size,
                                                 work, rep)}
        order = ["ad", "anomalib"] if rep % 2 == 0 else ["anomalib", "ad"]
        for name in order:
            before = uptime()
            progress(f"[{rep + 1}/{args.repeat}] {name} predict command; {before}")
            command, outputs[name] = commands[name]
            wall = timed(command, cwd=work, log=work / f"predict-{name}-{rep}.log")
            runs[name].append({"wall_s": wall, "uptime_before": before, "uptime_after": uptime()})
    ad_scores, anomalib_scores = read_scores(outputs["ad"]), read_scores(outputs["anomalib"])
    if set(ad_scores) != set(anomalib_scores):
        raise RuntimeError(f"the two commands scored different images ({len(ad_scores)} vs {len(anomalib_scores)})")
    from scipy.stats import spearmanr

    keys = sorted(ad_scores)
    rho = spearmanr([ad_scores[k] for k in keys], [anomalib_scores[k] for k in keys]).statistic
    medians = {name: statistics.median(r["wall_s"] for r in column) for name, column in runs.items()}
    return {"runs": runs, "images": len(keys), "score_rank_correlation": float(rho),
            "anomalib_batch_size": args.anomalib_batch_size or "data_path (1)",
            **{f"{name}_median_s": value for name, value in medians.items()},
            "ratio": medians["ad"] / medians["anomalib"]}


# -- report -----------------------------------------------------------------------------------------


def verdict(value: float | None, target: float) -> str:
    return "—" if value is None else ("yes" if value <= target else "**NO**")


def format_report(r: dict) -> str:
    m, d = r["machine"], r["data"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), torch {m['torch']}, "
             f"{m['threads']} threads, Python {m['python']}; load average at start {m['load_avg_at_start']}, "
             f"at end {r['load_avg_at_end']}; ad {m['ad_revision']}; {r['date']}.",
             f"Data: {d['root']}/{d['category']}: models fitted on {d['n_train']} good images; "
             f"{d['n_images']} test images of {d['source_size']} px scored at 256 px; one random state dict per "
             "backbone, both libraries.", "",
             f"In-process, CPU, {m['threads']} torch threads, milliseconds per image (median over batches) and "
             "images/s; floor = the bundle's own FeatureExtractor alone on the same batches; the last column is "
             "the ratio of the fastest runs (the least disturbed by other work):", "",
             "| model | precision | batch | ad predict ms/img | images/s | model alone ms/img | floor ms/img "
             "| floor images/s | predict / floor | fastest runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["in_process"].items():
        for batch_size, b in x["batches"].items():
            lines.append(f"| {name} {x['backbone']} | {x['precision']}{', NHWC' if x['channels_last'] else ''} | "
                         f"{batch_size} | {b['predict_ms_per_image']:.1f} | {b['predict_images_per_s']:.1f} | "
                         f"{b['model_ms_per_image']:.1f} | {b['floor_ms_per_image']:.1f} | "
                         f"{b['floor_images_per_s']:.1f} | {b['predict_over_floor']:.2f}× | "
                         f"{b['fastest_predict_over_floor']:.2f}× |")
    promises = []
    for name, target in FLOOR_TARGETS.items():
        if name in r["in_process"]:
            value = r["in_process"][name]["batches"][1]["predict_over_floor"]
            promises.append((f"{name} batch-1 latency / backbone floor", value, target))
    if (c := r.get("commands")) is not None:
        lines += ["", f"Whole commands on the same {c['images']} images, cold processes, wall seconds, median of "
                      f"{len(c['runs']['ad'])} (alternating order); anomalib batch size {c['anomalib_batch_size']}:",
                  "", "| command | median s | every run (s) |", "|---|---|---|"]
        for name, label in (("ad", "python -m ad.predict RUN_DIR IMAGES (PaDiM bundle)"),
                            ("anomalib", "anomalib 2.x Engine.predict script (PaDiM checkpoint)")):
            every = ", ".join(f"{run['wall_s']:.2f}" for run in c["runs"][name])
            lines.append(f"| {label} | {c[f'{name}_median_s']:.2f} | {every} |")
        promises.append(("ad.predict command / anomalib predict command", c["ratio"], ANOMALIB_TARGET))
        lines.append(f"\nScore rank correlation ad vs anomalib (Spearman, same images and weights): "
                     f"{c['score_rank_correlation']:.3f}")
        loads = [f"{run['uptime_before'].split('load average:')[-1].strip()} → "
                 f"{run['uptime_after'].split('load average:')[-1].strip()}"
                 for name in ("ad", "anomalib") for run in c["runs"][name]]
        lines.append("Load average (1, 5, 15 min) before → after each command: " + "; ".join(loads))
    lines += ["", "| promise | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | ≤ {target:.2f} | {verdict(value, target)} |"
              for name, value, target in promises]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "uptime_at_start": uptime()}
    progress(f"machine: {results['machine']}; {results['uptime_at_start']}")
    good = args.n_images // 2
    data = argparse.Namespace(root=None, category=args.category, n_train=args.n_train, n_test_good=good,
                              n_test_defect=args.n_images - good, source_size=args.source_size, data_dir=args.data_dir)
    root, category = prepare_data(data)
    image_dir = root / category / "test"
    results["data"] = {"root": str(root), "category": category, "n_train": args.n_train, "n_images": args.n_images,
                       "source_size": args.source_size}
    weights_dir = Path(args.data_dir).expanduser().resolve() / "weights"
    work = Path(tempfile.mkdtemp(prefix="ad-bench-predict-"))
    try:
        run_dirs = {}
        for name in args.models:
            weights = shared_weights(BACKBONES[name], weights_dir)
            progress(f"fitting ad {name} ({BACKBONES[name]}) once, untimed")
            run_ad(name, root, category, weights, work, f"fit-{name}", work / "cache")
            run_dirs[name] = work / f"fit-{name}"
        results["in_process"] = {name: in_process(name, run_dirs[name], image_dir, args) for name in args.models}
        if args.anomalib_python:
            weights = shared_weights(BACKBONES["padim"], weights_dir)
            run_dir = run_dirs.get("padim") or work / "fit-padim"
            if "padim" not in run_dirs:
                run_ad("padim", root, category, weights, work, "fit-padim", work / "cache")
            ckpt = fit_anomalib(args.anomalib_python, root, category, weights, work,
                                Path(args.data_dir).expanduser().resolve() / "anomalib")
            results["commands"] = whole_commands(run_dir, ckpt, image_dir, args, work)
    finally:
        if args.keep:
            progress(f"run folders kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["load_avg_at_end"] = load_now()
    results["uptime_at_end"] = uptime()
    return publish(results, format_report(results), args.out)


if __name__ == "__main__":
    main()
