"""Wall time per training epoch of ``ad``'s STFPM and Reverse Distillation against anomalib 2.x's.

On one MVTec-layout category (by default generated: 64 train + 16 test images of 256 px; or real
data with ``--root DIR --category NAME``), with the same randomly initialised backbone weights file
loaded into both libraries' frozen teacher/encoder, each library trains ``--epochs`` epochs:

- ``python -m ad.launch model=X dataset=mvtec ... trainer.max_epochs=E tracking=none`` with a fresh
  ``$AD_CACHE_DIR`` (defaults otherwise: batch 32, feature cache on, checkpoints every epoch). Epoch
  1 is ``train/epoch_s`` from its log line (teacher features computed and cached); epoch k ≥ 2 is
  the time between the log lines of epochs k-1 and k, so the checkpoint write is included.
- ``benchmarks/anomalib_train.py`` under ``--anomalib-python``: anomalib's defaults, validation
  off, its default checkpointing; epoch k is the time from its start to the next epoch's start.

The promise checked (issue 4): ad's wall time per epoch at most half of anomalib's, on epochs 2+
(steady state: what a 100- or 200-epoch run is made of); epoch 1 is reported alongside.

    python benchmarks/bench_trained.py --anomalib-python /tmp/anomalib-venv/bin/python
    python benchmarks/bench_trained.py --models stfpm --epochs 3 --anomalib-python /tmp/anomalib-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
from bench_padim import HERE, machine_info, prepare_data, progress, publish, timed

BACKBONES = {"stfpm": "resnet18", "reverse_distillation": "wide_resnet50_2"}
TARGET_RATIO = 0.5  # ad epoch seconds / anomalib epoch seconds, at most
EPOCH_LINE = re.compile(r"^\[(?P<time>[\d\- :,]+)\]\[ad\.trainer\]\[INFO\] - epoch (?P<epoch>\d+)/\d+: .*"
                        r"epoch_s (?P<epoch_s>[\d.e+-]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stfpm,reverse_distillation", help="comma-separated")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per library and model (default 3)")
    parser.add_argument("--backbone", help="backbone for every model (default: each model's, as in BACKBONES)")
    data = parser.add_argument_group("data (default: a generated category of 64 + 16 images of 256 px)")
    data.add_argument("--root", help="folder holding MVTec-layout categories (real data); default: generate one")
    data.add_argument("--category", default="bottle")
    data.add_argument("--n-train", type=int, default=64)
    data.add_argument("--n-test-good", type=int, default=8)
    data.add_argument("--n-test-defect", type=int, default=8)
    data.add_argument("--source-size", type=int, default=256, help="pixel side of generated files")
    data.add_argument("--data-dir", default="/tmp/ad-bench-data", help="where generated data is cached")
    parser.add_argument("--anomalib-python", help="Python of an anomalib 2.x install; without it ad only")
    parser.add_argument("--workers", type=int, default=None, help="anomalib DataLoader workers (default: its 8)")
    parser.add_argument("--out", help="also write the results as JSON here")
    return parser.parse_args(argv)


def make_weights(backbone: str, path: Path) -> Path:
    """A randomly initialised full timm state dict (seed 0) that both libraries load: same teacher."""
    import timm

    if not path.exists():
        torch.manual_seed(0)
        torch.save(timm.create_model(backbone, pretrained=False).state_dict(), path)
    return path


def ad_epoch_seconds(log: Path) -> list[float]:
    """Per-epoch wall seconds from the run's log: epoch 1 its own timer, later ones line to line."""
    stamps, first = [], None
    for line in log.read_text().splitlines():
        if match := EPOCH_LINE.match(line):
            stamps.append(datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp())
            first = float(match["epoch_s"]) if first is None else first
    if not stamps:
        raise RuntimeError(f"no epoch lines in {log}")
    return [first, *(b - a for a, b in zip(stamps, stamps[1:], strict=False))]


def run_ad(model: str, backbone: str, root: Path, category: str, weights: Path, epochs: int, work: Path) -> dict:
    run_dir = work / f"ad-{model}"
    command = [sys.executable, "-m", "ad.launch", f"model={model}", f"backbone={backbone}", "dataset=mvtec",
               f"dataset.root={root}",
               f"dataset.category={category}", f"backbone.weights={weights}", f"trainer.max_epochs={epochs}",
               "tracking=none", f"hydra.run.dir={run_dir}"]
    wall = timed(command, cwd=work, log=work / f"ad-{model}.out", env={"AD_CACHE_DIR": str(work / f"cache-{model}")})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": wall, "fit_s": metrics["fit_s"], "epoch_s": ad_epoch_seconds(run_dir / "launch.log")}


def run_anomalib(python: str, model: str, backbone: str, root: Path, category: str, weights: Path, epochs: int,
                 workers: int | None, work: Path) -> dict:
    out, run_dir = work / f"anomalib-{model}.json", work / f"anomalib-{model}"
    run_dir.mkdir(exist_ok=True)
    command = [python, str(HERE / "anomalib_train.py"), "--model", model, "--backbone", backbone, "--root",
               str(root), "--category", category, "--weights", str(weights), "--epochs", str(epochs), "--out", str(out)]
    if workers is not None:
        command += ["--workers", str(workers)]
    wall = timed(command, cwd=run_dir, log=work / f"anomalib-{model}.out")
    result = json.loads(out.read_text())
    return {"wall_s": wall, **result, "epoch_s": result["epoch_wall_s"]}  # as ad's: checkpoint writing included


def steady(epoch_s: list[float]) -> float:
    """Median seconds of epochs 2+ (epoch 1 alone when only one ran)."""
    return statistics.median(epoch_s[1:] or epoch_s)


def format_report(results: dict) -> str:
    info = results["machine"]
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads; "
             f"load average at start {info['load_avg_at_start']}; ad {info['ad_revision']}.",
             f"Data: {results['data']}; {results['epochs']} epochs each; batch 32; same random teacher weights.",
             "", "| model | backbone | ad epoch 1 | ad epochs 2+ | anomalib epoch 1 | anomalib epochs 2+ | "
             "ad / anomalib (2+) | target ≤ 0.5 |", "|---|---|---|---|---|---|---|---|"]
    for model, r in results["models"].items():
        ad, anomalib = r["ad"]["epoch_s"], (r.get("anomalib") or {}).get("epoch_s")
        ratio = steady(ad) / steady(anomalib) if anomalib else None
        theirs = "— | — | — | — |"
        if anomalib:
            met = "yes" if ratio <= TARGET_RATIO else "NO"
            theirs = f"{anomalib[0]:.1f} s | {steady(anomalib):.1f} s | {ratio:.2f} | {met} |"
        lines.append(f"| {model} | {r['backbone']} | {ad[0]:.1f} s | {steady(ad):.1f} s | {theirs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root, category = prepare_data(args)
    generated = f" ({args.n_train} train, {args.n_test_good + args.n_test_defect} test, {args.source_size} px)"
    results = {"machine": machine_info(), "epochs": args.epochs, "models": {},
               "data": f"{root}/{category}" + ("" if args.root else generated)}
    with tempfile.TemporaryDirectory(prefix="bench-trained-") as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            backbone = args.backbone or BACKBONES[model]
            weights = make_weights(backbone, Path(args.data_dir) / f"{backbone}_random_seed0.pth")
            progress(f"{model} ({backbone}): ad, {args.epochs} epochs")
            entry = {"ad": run_ad(model, backbone, root, category, weights, args.epochs, work)}
            if args.anomalib_python:
                progress(f"{model} ({backbone}): anomalib, {args.epochs} epochs")
                entry["anomalib"] = run_anomalib(args.anomalib_python, model, backbone, root, category, weights,
                                                 args.epochs, args.workers, work)
            progress(json.dumps({k: v["epoch_s"] for k, v in entry.items()}))
            results["models"][model] = {"backbone": backbone, **entry}
    return publish(results, format_report(results), args.out)


if __name__ == "__main__":
    main()
