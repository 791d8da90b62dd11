"""Wall seconds per training epoch of CFlow and GANomaly in ``ad`` against anomalib 2.x on the same data.

On one MVTec-layout category (by default generated: 32 good training images of 256 px, resized to
``--image-size``), each library trains each model for ``--epochs`` epochs with the same settings:

* ``ad``: ``python -m ad.launch model=X dataset=mvtec ... trainer.max_epochs=E`` with a fresh
  ``$AD_CACHE_DIR`` (epoch 1 computes the backbone features, later epochs read them back from the
  feature cache, as any ad run does); per-epoch seconds are the trainer's ``train/epoch_s``, read from
  MLflow (training only: no evaluation, checkpoint writing excluded);
* anomalib: ``benchmarks/anomalib_train.py`` under ``--anomalib-python`` (validation off,
  per-epoch seconds from a Lightning callback, checkpoint writing excluded).

CFlow uses ``--cflow-backbone`` (random weights) in both, layers 2-4 and all paper settings; GANomaly
anomalib's defaults (64 features, latent 100). The issue's target: ad's epoch at most half of
anomalib's. The models are interleaved within each repetition so background load hits both alike;
the minimum over repetitions of each epoch is kept.

    python benchmarks/bench_cflow_ganomaly.py --anomalib-python /tmp/anomalib-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_padim import HERE, OFFLINE_ENV, machine_info, prepare_data, progress, publish

MODELS = ("cflow", "ganomaly")
TARGET_RATIO = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: cflow, ganomaly")
    parser.add_argument("--root", help="folder holding MVTec-layout categories (real data); default: generate one")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--n-train", type=int, default=32, help="generated good training images (default 32)")
    parser.add_argument("--source-size", type=int, default=256, help="generated PNG side in px (default 256)")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ad-bench-data"))
    parser.add_argument("--image-size", type=int, default=128, help="model input side (default 128; papers 256)")
    parser.add_argument("--cflow-backbone", default="resnet18", help="CFlow encoder (paper: wide_resnet50_2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="repetitions, minimum per epoch kept (default 1)")
    parser.add_argument("--anomalib-python", help="Python of a venv with anomalib 2.x; omitted: ad only")
    parser.add_argument("--anomalib-workers", type=int, default=None)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.n_test_good, args.n_test_defect = 4, 4  # training only: the test split just has to exist
    return args


def run_ad(model: str, root: Path, category: str, args: argparse.Namespace, work: Path) -> list[float]:
    """Train with ad's command line; return the trainer's per-epoch seconds from MLflow."""
    from mlflow.tracking import MlflowClient

    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work}/mlflow.db"
    overrides = [f"model={model}", "dataset=mvtec", f"dataset.root={root}", f"dataset.category={category}",
                 f"dataset.image_size={args.image_size}", f"trainer.batch_size={args.batch_size}",
                 f"trainer.max_epochs={args.epochs}", f"tracking.uri={uri}", "tracking.log_model=false",
                 "tracking.num_images=0", f"hydra.run.dir={work}/run", "backbone.weights=random"]
    if model == "cflow":
        overrides.append(f"backbone={args.cflow_backbone}")
    env = {**os.environ, **OFFLINE_ENV, "AD_CACHE_DIR": str(work / "cache")}
    result = subprocess.run([sys.executable, "-m", "ad.launch", *overrides], cwd=work, env=env,
                            capture_output=True, text=True)
    (work / "launch.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"ad {model} failed; see {work / 'launch.log'}")
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    history = client.get_metric_history(runs[0].info.run_id, "train/epoch_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def run_anomalib(model: str, root: Path, category: str, args: argparse.Namespace, work: Path) -> list[float]:
    """Train with anomalib's Engine in its own venv; return its per-epoch seconds."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "anomalib.json"
    command = [args.anomalib_python, str(HERE / "anomalib_train.py"), "--model", model, "--root", str(root),
               "--category", category, "--backbone", args.cflow_backbone, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--out", str(out)]
    if args.anomalib_workers is not None:
        command += ["--workers", str(args.anomalib_workers)]
    result = subprocess.run(command, cwd=work, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True)
    (work / "anomalib.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"anomalib {model} failed; see {work / 'anomalib.log'}")
    return json.loads(out.read_text())["epoch_s"]


def elementwise_min(runs: list[list[float]]) -> list[float]:
    return [min(values) for values in zip(*runs, strict=True)] if runs else []


def format_report(results: dict) -> str:
    info, settings = results["machine"], results["settings"]
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads; "
        f"load average at start {info['load_avg_at_start']}; ad {info['ad_revision']}.",
        f"Data: {settings['n_train']} training images resized to {settings['image_size']} px, batch "
        f"{settings['batch_size']}, {settings['epochs']} epochs; CFlow encoder {settings['cflow_backbone']} "
        f"(random weights), layers 2-4. Seconds per training epoch, minimum of {settings['repeat']} run(s).",
        "",
        "| model | epoch | ad s | anomalib s | ad / anomalib |",
        "|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        for i, ad_s in enumerate(r["ad"]):
            theirs = r["anomalib"][i] if i < len(r["anomalib"]) else None
            ratio = f"{ad_s / theirs:.2f}" if theirs else "—"
            lines.append(f"| {model} | {i + 1} | {ad_s:.2f} | {f'{theirs:.2f}' if theirs else '—'} | {ratio} |")
    lines += ["", f"Target: ad's epoch ≤ {TARGET_RATIO:.1f}× anomalib's (epochs after the first: ad's feature "
              "cache is warm, as in any run of more than one epoch)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root, category = prepare_data(args)
    machine = machine_info()
    runs: dict[str, dict[str, list[list[float]]]] = {m: {"ad": [], "anomalib": []} for m in args.models}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for rep in range(args.repeat):
            for model in args.models:
                progress(f"rep {rep + 1}: ad {model}")
                runs[model]["ad"].append(run_ad(model, root, category, args, Path(tmp) / f"ad-{model}-{rep}"))
                if args.anomalib_python:
                    progress(f"rep {rep + 1}: anomalib {model}")
                    runs[model]["anomalib"].append(
                        run_anomalib(model, root, category, args, Path(tmp) / f"anomalib-{model}-{rep}"))
    results = {
        "machine": machine,
        "settings": {k: getattr(args, k) for k in ("n_train", "image_size", "batch_size", "epochs",
                                                   "cflow_backbone", "repeat")},
        "models": {m: {lib: elementwise_min(r) for lib, r in libs.items()} for m, libs in runs.items()},
        "raw": runs,
    }
    return publish(results, format_report(results), args.out)


if __name__ == "__main__":
    main()
