"""PatchCore, DFM and DFKDE (and optionally PaDiM) in ``ad`` against anomalib 2.x: speed, cache speed-up, metrics.

For each model, on one MVTec-layout category (by default generated with ``make_mvtec_layout``: 60
train + 20 good + 20 defective test images of 256 px, the issue's "60 images of 256 px"; or real
data with ``--root DIR --category NAME``), with the same randomly initialised weights file of the
model's backbone loaded into both libraries:

1. ``python -m ad.launch model=X dataset=mvtec ... tracking=none`` with a fresh ``$AD_CACHE_DIR``
   (cold: decoding, backbone and cache writes included), then the same command again on that cache
   (warm: the second run of a sweep over the model's own settings); fit + test seconds from its
   metrics.json, and image AUROC, pixel AUROC and pixel AUPRO;
2. anomalib's model with its default settings, backbone and layers (``benchmarks/anomalib_run.py``
   under the Python given by ``--anomalib-python``; skipped without it), its default evaluator plus
   anomalib's AUPRO, without the visualizer; the seconds its AUPRO takes are left out of its fit +
   test, since its default evaluator has none. Its metrics are reported twice: as its evaluator
   computes them (after its post-processor min-max normalises and clamps scores and maps) and as
   ``ad``'s metric code computes them on its raw scores and maps (the methods compared alone).

Each timing is repeated (``--repeat``; anomalib's PatchCore, minutes per run on 2 cores, only
``--patchcore-anomalib-repeat`` times) and the minimum is kept; the columns are interleaved within
each repetition so background load hits them alike. The targets checked: ``ad`` fit + test at most
1/10 of anomalib's for PatchCore and 1/3 for DFM, DFKDE (and PaDiM); warm runs at least 5× faster
than cold ones; metrics within 0.02 of anomalib's on the same weights and images.

    python benchmarks/bench_methods.py --quick
    python benchmarks/bench_methods.py --anomalib-python /tmp/anomalib-venv/bin/python --out methods.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_padim import HERE, machine_info, prepare_data, progress, publish, secs, timed

#: Each model's default backbone in both libraries (ad: conf/model/<name>.yaml; anomalib: its signature).
BACKBONES = {"padim": "resnet18", "patchcore": "wide_resnet50_2", "dfm": "resnet50", "dfkde": "resnet18"}
LAYERS = {"padim": "layer1-3", "patchcore": "layer2+3", "dfm": "layer3", "dfkde": "layer4"}
#: ad fit+test / anomalib fit+test, at most (issue 3; PaDiM's from issue 1).
SPEED_TARGETS = {"patchcore": 1 / 10, "dfm": 1 / 3, "dfkde": 1 / 3, "padim": 1 / 3}
CACHE_SPEEDUP_TARGET = 5.0
METRIC_TOLERANCE = 0.02
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="patchcore,dfm,dfkde",
                        help="comma-separated, from: " + ", ".join(BACKBONES) + " (default: patchcore,dfm,dfkde)")
    data = parser.add_argument_group("data (default: a generated category of 60 + 40 images of 256 px)")
    data.add_argument("--root", help="folder holding MVTec-layout categories (real data); default: generate one")
    data.add_argument("--category", default="bottle", help="category folder (default: bottle)")
    data.add_argument("--n-train", type=int, default=60, help="generated good training images (default 60)")
    data.add_argument("--n-test-good", type=int, default=20, help="generated good test images (default 20)")
    data.add_argument("--n-test-defect", type=int, default=20, help="generated defective test images (default 20)")
    data.add_argument("--source-size", type=int, default=256, help="generated PNG side in px (default 256)")
    data.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ad-bench-data"),
                      help="where generated categories and the weights files are kept between runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke configuration: 20 train / 10 test images of 256 px, 1 repetition")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per timing, minimum kept (default 3)")
    parser.add_argument("--patchcore-anomalib-repeat", type=int, default=1,
                        help="repetitions of anomalib's PatchCore (minutes each on 2 cores; default 1)")
    parser.add_argument("--weights", choices=("shared", "random"), default="shared",
                        help="shared: one random state dict per backbone for both libraries; random: each its own")
    parser.add_argument("--anomalib-python", help="Python of a venv with anomalib 2.x; omitted: no anomalib column")
    parser.add_argument("--anomalib-workers", type=int, default=None,
                        help="anomalib DataLoader workers (default: anomalib's own default)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders (printed)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in BACKBONES]
    if unknown or not args.models:
        parser.error(f"--models: {', '.join(unknown) or 'none given'}; choose from {', '.join(BACKBONES)}")
    if args.quick:
        args.n_train, args.n_test_good, args.n_test_defect, args.source_size = 20, 4, 6, 256
        args.repeat = args.repeat or 1
        args.patchcore_anomalib_repeat = min(args.patchcore_anomalib_repeat, args.repeat)
    args.repeat = args.repeat or 3
    return args


def shared_weights(backbone: str, folder: Path) -> Path:
    """A randomly initialised timm state dict of ``backbone`` (seed 0), made once and kept: both libraries load it."""
    import timm

    path = folder / f"{backbone}_random_seed0.pth"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        progress(f"saving random {backbone} weights to {path} (once; kept)")
        torch.manual_seed(0)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(timm.create_model(backbone, pretrained=False).state_dict(), tmp)
        os.replace(tmp, path)  # never a half-written file under the final name
    return path


def run_ad(model: str, root: Path, category: str, weights: Path | None, work: Path, name: str,
           cache_dir: Path) -> dict:
    """One ``python -m ad.launch model=<model> ... tracking=none`` run; wall, fit and test seconds, metrics."""
    run_dir = work / name
    command = [sys.executable, "-m", "ad.launch", f"model={model}", "dataset=mvtec", f"dataset.root={root}",
               f"dataset.category={category}", f"backbone.weights={weights or 'random'}", "tracking=none",
               f"hydra.run.dir={run_dir}"]
    wall = timed(command, cwd=work, log=work / f"{name}.log", env={"AD_CACHE_DIR": str(cache_dir)})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": wall, "fit_s": metrics["fit_s"], "test_s": metrics["test_s"],
            **{k: metrics[k] for k in METRICS if k in metrics}}


def run_anomalib(python: str, model: str, root: Path, category: str, weights: Path | None, workers: int | None,
                 work: Path, name: str) -> dict:
    """One run of ``anomalib_run.py`` under anomalib's own Python (fresh process, like ad's).

    ``fit_s`` and ``test_s`` are anomalib's; ``fit_test_s`` leaves out the AUPRO seconds, which
    anomalib's default evaluator would not spend.
    """
    out, run_dir = work / f"{name}.json", work / name
    run_dir.mkdir()
    command = [python, str(HERE / "anomalib_run.py"), "--model", model, "--root", str(root), "--category", category,
               "--no-visualizer", "--out", str(out)]
    if weights is not None:
        command += ["--weights", str(weights)]
    if workers is not None:
        command += ["--workers", str(workers)]
    wall = timed(command, cwd=run_dir, log=work / f"{name}.log")
    result = json.loads(out.read_text())
    keep = ("fit_s", "test_s", "import_s", "aupro_s", *METRICS)
    return {"wall_s": wall, **{k: result[k] for k in keep if k in result}, "versions": result.get("versions"),
            "raw": raw_metrics(out.with_suffix(".raw.pt"))}


def raw_metrics(path: Path) -> dict:
    """``ad``'s metrics on anomalib's raw test outputs (before its post-processor normalises and clamps them).

    Against ``ad``'s own figures this compares the methods alone, with the metric code held equal.
    """
    from ad.metrics import compute_metrics

    raw = torch.load(path)
    metrics = compute_metrics(raw["scores"].double(), raw["labels"].long(), raw["maps"], raw["masks"])
    return {k: metrics[k] for k in METRICS if k in metrics}


def fit_test(run: dict) -> float:
    """Fit + test seconds of one run, without the AUPRO time anomalib's defaults would not spend."""
    return run["fit_s"] + run["test_s"] - run.get("aupro_s", 0.0)


def best_of(runs: list[dict]) -> dict:
    """Minimum of every timing over the repetitions; metrics from the first run; all runs kept."""
    best = dict(runs[0])
    for key in ("wall_s", "fit_s", "test_s", "import_s", "aupro_s"):
        if key in best:
            best[key] = min(r[key] for r in runs)
    best["fit_test_s"] = min(fit_test(r) for r in runs)
    best["runs"] = runs
    return best


def summarise(model: str, runs: dict[str, list[dict]]) -> dict:
    """Best timings per column, the ratios against the targets and the metric differences of one model."""
    out = {"backbone": BACKBONES[model], "layers": LAYERS[model],
           **{column: best_of(column_runs) for column, column_runs in runs.items() if column_runs}}
    cold, warm, anomalib = out.get("ad_cold"), out.get("ad_warm"), out.get("anomalib")
    out["cache_speedup"] = cold["fit_test_s"] / warm["fit_test_s"] if cold and warm else None
    out["warm_metrics_equal"] = all(warm.get(k) == cold.get(k) for k in METRICS) if cold and warm else None
    if anomalib:
        out["ratio"] = cold["fit_test_s"] / anomalib["fit_test_s"]
        out["metric_diff"] = {k: cold[k] - anomalib[k] for k in METRICS if k in cold and k in anomalib}
        raw = anomalib["raw"]
        out["metric_diff_raw"] = {k: cold[k] - raw[k] for k in METRICS if k in cold and k in raw}
        out["metrics_only_in"] = {"ad": [k for k in METRICS if k in cold and k not in anomalib],
                                  "anomalib": [k for k in METRICS if k in anomalib and k not in cold]}
    out["targets"] = {"ratio": SPEED_TARGETS[model], "cache_speedup": CACHE_SPEEDUP_TARGET,
                      "metric_tolerance": METRIC_TOLERANCE}
    return out


# -- report -------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**NO**")


def metric_cells(m: dict, key: str) -> str:
    """'ad / anomalib (Δ) / anomalib raw (Δ)' for one metric, or what is absent."""
    ad, anomalib = m["ad_cold"].get(key), m.get("anomalib", {})
    ref, raw = anomalib.get(key), anomalib.get("raw", {}).get(key)
    if ad is None and ref is None:
        return "— (image-level model)"
    cells = [f"{value:.3f}" + (f" ({ad - value:+.3f})" if ad is not None and value is not None and i else "")
             if value is not None else "—" for i, value in enumerate((ad, ref, raw))]
    return " / ".join(cells)


def format_report(r: dict) -> str:
    """Machine and data lines, then a speed table and a quality table (one row per model)."""
    m, d = r["machine"], r["data"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), torch {m['torch']}, "
             f"{m['threads']} threads, Python {m['python']}; load average at start {m['load_avg_at_start']}, "
             f"at end {r['load_avg_at_end']}; ad {m['ad_revision']}; {r['date']}.",
             f"Data: {d['root']}/{d['category']}: {d['n_train']} train + {d['n_test']} test images, "
             f"resized to 256 px; backbone weights: {r['weights']} "
             "(one random state dict per backbone, both libraries).",
             f"Seconds of fit + test, each the minimum of {r['repeat']} repetition(s) "
             f"(anomalib PatchCore: {r['patchcore_anomalib_repeat']}); shared machine, noisy.", "",
             "| model | backbone | ad cold | ad warm | cache speed-up (≥ 5×) | anomalib | ad / anomalib | target "
             "| met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["models"].items():
        cold, warm, ref = x["ad_cold"], x.get("ad_warm"), x.get("anomalib")
        speedup = x["cache_speedup"]
        ratio = x.get("ratio")
        lines.append(
            f"| {name} | {x['backbone']} {x['layers']} | {secs(cold['fit_test_s'])} | "
            f"{secs(warm['fit_test_s']) if warm else '—'} | "
            f"{f'{speedup:.1f}× ' + verdict(speedup >= CACHE_SPEEDUP_TARGET) if speedup else '—'} | "
            f"{secs(ref['fit_test_s']) if ref else '—'} | {f'{ratio:.3f}' if ratio else '—'} | "
            f"≤ {x['targets']['ratio']:.3f} | {verdict(None if ratio is None else ratio <= x['targets']['ratio'])} |")
    if any("anomalib" in x for x in r["models"].values()):
        lines += ["", "Metrics as ad / anomalib's evaluator (Δ = ad − anomalib) / ad's metric code on anomalib's "
                      "raw scores and maps (Δ):", "",
                  "| model | image AUROC | pixel AUROC | pixel AUPRO | within 0.02 of evaluator | of raw |",
                  "|---|---|---|---|---|---|"]
        for name, x in r["models"].items():
            if "anomalib" in x:
                within = [all(abs(v) <= METRIC_TOLERANCE for v in x[key].values()) if x[key] else None
                          for key in ("metric_diff", "metric_diff_raw")]
                cells = " | ".join(metric_cells(x, k) for k in METRICS)
                lines.append(f"| {name} | {cells} | {verdict(within[0])} | {verdict(within[1])} |")
        versions = next(x["anomalib"]["versions"] for x in r["models"].values() if "anomalib" in x)
        lines.append(f"\nanomalib versions: {versions}")
    else:
        lines += ["", "ad metrics (no anomalib column): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {x['ad_cold'][k]:.3f}" for k in METRICS if k in x["ad_cold"])
            for name, x in r["models"].items())]
    unequal = [name for name, x in r["models"].items() if x["warm_metrics_equal"] is False]
    if unequal:
        lines.append(f"WARNING: warm-cache metrics differ from cold ones for {', '.join(unequal)}")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "repeat": args.repeat, "patchcore_anomalib_repeat": args.patchcore_anomalib_repeat,
                     "weights": args.weights}
    progress(f"machine: {results['machine']}")
    root, category = prepare_data(args)
    n_train = len(list((root / category / "train").rglob("*.png")))
    n_test = len(list((root / category / "test").rglob("*.png")))
    results["data"] = {"root": str(root), "category": category, "n_train": n_train, "n_test": n_test}
    weights_dir = Path(args.data_dir).expanduser().resolve() / "weights"
    weights = {m: shared_weights(BACKBONES[m], weights_dir) if args.weights == "shared" else None for m in args.models}
    work = Path(tempfile.mkdtemp(prefix="ad-bench-methods-"))
    runs = {m: {"ad_cold": [], "ad_warm": [], "anomalib": []} for m in args.models}
    try:
        for rep in range(args.repeat):
            for model in args.models:
                step = f"[{rep + 1}/{args.repeat}] {model}"
                cache = work / f"cache-{model}-{rep}"  # fresh: the cold run fills it, the warm run reads it
                for column in ("ad_cold", "ad_warm"):
                    progress(f"{step}: ad, {column.removeprefix('ad_')} feature cache")
                    result = run_ad(model, root, category, weights[model], work, f"{model}-{column}-{rep}", cache)
                    runs[model][column].append({**result, "load_avg": os.getloadavg()[0]})
                anomalib_repeat = args.patchcore_anomalib_repeat if model == "patchcore" else args.repeat
                if args.anomalib_python and rep < anomalib_repeat:
                    progress(f"{step}: anomalib")
                    result = run_anomalib(args.anomalib_python, model, root, category, weights[model],
                                          args.anomalib_workers, work, f"{model}-anomalib-{rep}")
                    runs[model]["anomalib"].append({**result, "load_avg": os.getloadavg()[0]})
        results["models"] = {m: summarise(m, runs[m]) for m in args.models}
    finally:
        if args.keep:
            progress(f"run folders kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    return publish(results, format_report(results), args.out)


if __name__ == "__main__":
    main()
