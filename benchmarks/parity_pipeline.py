"""Quality parity with anomalib 2.x through each library's whole pipeline, over categories and
seeds.

Runs under ad's Python; anomalib runs in its own, as a subprocess:

    python benchmarks/parity_pipeline.py --anomalib-python /tmp/anomalib-venv/bin/python --out parity.json
    python benchmarks/parity_pipeline.py --methods padim,patchcore,dfm,dfkde --seeds 0,1,2 \\
        --categories brick,grass,gravel,tissue --anomalib-python /tmp/anomalib-venv/bin/python
    python benchmarks/parity_pipeline.py --methods stfpm --side anomalib --seeds 1   # one resumable piece
    python benchmarks/parity_pipeline.py --report-only --out parity.json   # the table from saved runs

For every method × category × seed, both libraries start from the same files and nothing else:

1. one MVTec-layout category per (category, seed, image size), written by ad's generator
   (``make_mvtec_layout``: skimage textures, defects with masks in the test split), at the size the
   methods run at, so neither side resizes;
2. one random timm checkpoint per (backbone, seed) (``random_backbone`` of ``parity.py``), loaded by
   ad as ``backbone.weights`` and by anomalib as ``--weights``;
3. ``python -m ad.launch -m model=X dataset=mvtec ... seed=S tracking=none dataset.val_ratio=0
   threshold.method=none`` (one multirun per method, its jobs in turn in one process): ad's data
   loading, its own initialisation, its defaults (bf16 autocast where ``trainer.precision=auto``
   picks it, channels-last, the feature cache); the metrics are read from its metrics.json;
4. ``benchmarks/anomalib_run.py --raw-only`` (frozen-feature methods) or ``anomalib_train.py
   --test`` (trained methods) with ``--seed S``, a method's runs in one process: anomalib's
   ``MVTecAD`` datamodule, ``Engine`` fit and test, its own initialisation; its raw test scores and
   maps are scored with ad's metric functions (``ad.metrics.compute_metrics``), so only the methods
   differ, not the metric code.

``dataset.val_ratio=0`` keeps every good training image in ad's training set, as anomalib's; the
thresholds need that hold-out, so ``threshold.method=none``. Settings are matched explicitly in
``METHODS``; what differs by design is listed in benchmarks/README.md beside the table.

Each run's metrics, with the wall and CPU seconds of its batch shared out, are saved under
``--work`` as its batch finishes (or, after an interruption, by the next invocation), so a re-run
skips what is done; ``--side`` and ``--seeds`` split the work into pieces that can run at once. The
summary gives, per method and metric, the mean ± std over runs of each side and the paired
difference ad − anomalib (mean ± std, and the largest in size), as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
FROZEN = ("padim", "patchcore", "dfm", "dfkde")
TRAINED = ("stfpm", "reverse_distillation", "cflow", "ganomaly")


@dataclass(frozen=True)
class Method:
    """One method's matched settings: ad's overrides and anomalib's flags beside the shared ones."""

    image_size: int = 128
    batch_size: int = 32
    epochs: int | None = None  # trained methods only
    backbone: str | None = "resnet18"
    ad: tuple[str, ...] = ()
    anomalib: tuple[str, ...] = field(default=())


#: Each method's settings. Layers, feature counts, PCA levels, learning rates and the other
#: hyper-parameters are the two libraries' shared defaults and are not repeated here.
METHODS = {
    "padim": Method(),  # layer1-3, 100 random channels
    "patchcore": Method(ad=("model.projection_dim=null",)),  # coreset in anomalib's JL projection size
    "dfm": Method(),  # layer3, pooling 4, PCA 0.97, fre
    "dfkde": Method(),  # layer4, 16 PCA components, scale
    "stfpm": Method(batch_size=8, epochs=3),
    "reverse_distillation": Method(batch_size=8, epochs=3),
    "cflow": Method(batch_size=8, epochs=1),
    "ganomaly": Method(image_size=64, batch_size=8, epochs=15, backbone=None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join([*FROZEN, *TRAINED]), help="comma-separated, run in this order")
    parser.add_argument("--categories", default="brick,grass,gravel,tissue")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-train", type=int, default=32, help="good training images")
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-test-defect", type=int, default=10)
    parser.add_argument("--ad-precision", help="trainer.precision for ad (default: ad's own, auto)")
    parser.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    parser.add_argument("--work", default="/tmp/parity_pipeline", help="data, weights and every run's results")
    parser.add_argument("--side", choices=("ad", "anomalib", "both"), default="both",
                        help="run one library's side only (two invocations can then run at once)")
    parser.add_argument("--report-only", action="store_true",
                        help="save finished runs' results and summarise them; start nothing")
    parser.add_argument("--out", help="also write the summary as JSON here")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def category_data(work: Path, category: str, seed: int, size: int, counts: tuple[int, int, int]) -> Path:
    """The MVTec-layout root holding ``category`` generated for ``seed`` at ``size`` px (written once)."""
    from ad.data.synthetic import make_mvtec_layout

    root = work / "data" / f"{size}px-seed{seed}"  # counts are fixed per --work folder
    done = root / category / ".complete"
    if not done.exists():
        make_mvtec_layout(root, category, n_train=counts[0], n_test_good=counts[1], n_test_defect=counts[2],
                          image_size=size, seed=seed)
        done.touch()
    return root


def backbone_weights(work: Path, backbone: str, seed: int) -> Path:
    """One random timm checkpoint of ``backbone`` per seed, shared by both libraries."""
    folder = work / "weights"
    path = folder / f"{backbone}-random-{seed}.pth"
    if not path.exists():
        from parity import random_backbone

        folder.mkdir(parents=True, exist_ok=True)
        random_backbone(backbone, seed, folder)
    return path


def timed(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run ``command`` niced in ``log``'s folder (anomalib's checkpoints land there); wall and CPU (user+sys) s."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["nice", "-n", "5", *command], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                              env={**os.environ, **(env or {})}, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{command[:4]} failed ({done.returncode}); see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@dataclass
class Batch:
    """Runs of one method over seeds × categories, each side in one process (its start-up paid once)."""

    name: str
    method: Method
    seeds: list[int]
    categories: list[str]
    work: Path

    def data(self, seed: str | int) -> str:
        return str(self.work / "data" / f"{self.method.image_size}px-seed{seed}")

    def weights(self, seed: str | int) -> str:
        return str(self.work / "weights" / f"{self.method.backbone}-random-{seed}.pth")

    def folder(self, category: str, seed: int) -> Path:
        return self.work / "runs" / self.name / f"{category}-seed{seed}"

    @property
    def count(self) -> int:
        return len(self.seeds) * len(self.categories)


def run_ad(batch: Batch, precision: str | None) -> tuple[float, float]:
    """One ``ad.launch`` multirun over the batch (jobs run in turn in one process); wall and CPU seconds."""
    method = batch.method
    sweep = batch.work / "runs" / batch.name / "ad-sweep"
    command = [sys.executable, "-m", "ad.launch", "-m", f"model={batch.name}", "dataset=mvtec",
               f"dataset.root={batch.data('${seed}')}", f"dataset.category={','.join(batch.categories)}",
               f"seed={','.join(map(str, batch.seeds))}", f"dataset.image_size={method.image_size}",
               "dataset.val_ratio=0", "threshold.method=none", "tracking=none",
               f"trainer.batch_size={method.batch_size}", f"hydra.sweep.dir={sweep}",
               "hydra.sweep.subdir=${dataset.category}-seed${seed}", *method.ad]
    if method.backbone:
        command += [f"backbone={method.backbone}", f"backbone.weights={batch.weights('${seed}')}"]
    if method.epochs:
        command.append(f"trainer.max_epochs={method.epochs}")
    if precision:
        command.append(f"trainer.precision={precision}")
    sweep.mkdir(parents=True, exist_ok=True)
    return timed(command, sweep / "launch.out", env={"AD_CACHE_DIR": str(batch.work / "cache")})


def ad_output(batch: Batch, category: str, seed: int) -> Path:
    return batch.work / "runs" / batch.name / "ad-sweep" / f"{category}-seed{seed}" / "metrics.json"


def ad_result(batch: Batch, category: str, seed: int) -> dict:
    """One job's metrics from its metrics.json."""
    results = json.loads(ad_output(batch, category, seed).read_text())
    return {**{k: results[k] for k in METRICS if k in results}, "precision": results["precision"],
            "n_train": results["n_train"], "n_test": results["n_test"], "fit_s": results["fit_s"],
            "test_s": results["test_s"]}


def run_anomalib(batch: Batch, python: str) -> tuple[float, float]:
    """One anomalib process over the batch; wall and CPU seconds."""
    method = batch.method
    out = batch.work / "runs" / batch.name / "{category}-seed{seed}" / "anomalib.json"
    shared = ["--model", batch.name, "--root", batch.data("{seed}"), "--category", ",".join(batch.categories),
              "--seed", ",".join(map(str, batch.seeds)), "--image-size", str(method.image_size),
              "--batch-size", str(method.batch_size), "--workers", "0", "--out", str(out)]
    if method.backbone:
        shared += ["--backbone", method.backbone, "--weights", batch.weights("{seed}")]
    if batch.name in FROZEN:
        command = [python, str(HERE / "anomalib_run.py"), *shared, "--raw-only"]
    else:
        command = [python, str(HERE / "anomalib_train.py"), *shared, "--epochs", str(method.epochs), "--test"]
    log = batch.work / "runs" / batch.name / "anomalib.out"
    return timed([*command, *method.anomalib], log)


def anomalib_output(batch: Batch, category: str, seed: int) -> Path:
    return batch.folder(category, seed) / "anomalib.json"


def anomalib_result(batch: Batch, category: str, seed: int) -> dict:
    """ad's metrics on one anomalib run's raw test outputs."""
    import torch

    from ad.metrics import compute_metrics

    out = batch.folder(category, seed) / "anomalib.json"
    timings = json.loads(out.read_text())
    raw = torch.load(out.with_suffix(".raw.pt"), weights_only=True)
    metrics = compute_metrics(raw["scores"], raw["labels"], raw["maps"], raw["masks"])
    return {**{k: metrics[k] for k in METRICS if k in metrics}, "n_test": len(raw["scores"]),
            "fit_s": timings["fit_s"], "test_s": timings["test_s"]}


def run_all(args: argparse.Namespace, work: Path) -> None:
    """For each method, the (seed, category) runs not yet saved: ad's multirun, then anomalib's process."""
    counts = (args.n_train, args.n_test_good, args.n_test_defect)
    seeds, categories = [int(s) for s in args.seeds.split(",")], args.categories.split(",")
    for name in args.methods.split(","):  # every file first, so that concurrent invocations only read them
        for seed in seeds:
            if METHODS[name].backbone:
                backbone_weights(work, METHODS[name].backbone, seed)
            for category in categories:
                category_data(work, category, seed, METHODS[name].image_size, counts)
    for name in args.methods.split(","):
        method = METHODS[name]
        for side in ("ad", "anomalib") if args.side == "both" else (args.side,):
            whole = Batch(name, method, seeds, categories, work)
            harvest(whole, side, None)  # runs an interrupted invocation finished
            todo = [(c, s) for s in seeds for c in categories if not saved(whole, side, c, s).exists()]
            if not todo:
                continue
            # the product of the missing seeds and categories: a few done runs may be redone
            missing = {c for c, _ in todo}
            batch = Batch(name, method, sorted({s for _, s in todo}), [c for c in categories if c in missing], work)
            for seed in batch.seeds:
                for category in batch.categories:
                    batch.folder(category, seed).mkdir(parents=True, exist_ok=True)
                    # what is there afterwards comes from this batch
                    (ad_output if side == "ad" else anomalib_output)(batch, category, seed).unlink(missing_ok=True)
            progress(f"{name} {side}: seeds {batch.seeds} × {batch.categories}")
            wall, cpu = run_ad(batch, args.ad_precision) if side == "ad" else run_anomalib(batch, args.anomalib_python)
            progress(f"  {wall:.0f} s wall, {cpu:.0f} s CPU for {batch.count} runs")
            harvest(batch, side, (wall / batch.count, cpu / batch.count))


def saved(batch: Batch, side: str, category: str, seed: int) -> Path:
    return batch.folder(category, seed) / f"{side}.result.json"


def harvest(batch: Batch, side: str, seconds: tuple[float, float] | None) -> None:
    """Save the result of every run of ``batch`` whose output is there and whose result is not yet saved."""
    output, result = (ad_output, ad_result) if side == "ad" else (anomalib_output, anomalib_result)
    for seed in batch.seeds:
        for category in batch.categories:
            if saved(batch, side, category, seed).exists() or not output(batch, category, seed).exists():
                continue
            wall, cpu = seconds or (None, None)
            values = {**result(batch, category, seed), "batch_wall_s": wall, "batch_cpu_s": cpu}
            saved(batch, side, category, seed).write_text(json.dumps(values, indent=2) + "\n")
            progress(f"  {batch.name} {side} {category} seed {seed}: "
                     + " ".join(f"{k} {values[k]:.3f}" for k in METRICS if k in values))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(work: Path, methods: list[str]) -> dict:
    """Per method and metric: each side's mean ± std over the saved runs, and the paired differences."""
    summary = {}
    for name in methods:
        pairs = []
        for folder in sorted((work / "runs" / name).glob("*-seed*")):
            files = [folder / f"{side}.result.json" for side in ("ad", "anomalib")]
            if all(f.exists() for f in files):
                pairs.append((folder.name, *(json.loads(f.read_text()) for f in files)))
        if not pairs:
            continue
        entry = {"runs": len(pairs), "runs_list": [p[0] for p in pairs], "precision": pairs[0][1].get("precision"),
                 "cpu_s": {side: statistics.median([p[i]["batch_cpu_s"] for p in pairs if p[i]["batch_cpu_s"]] or [0])
                           for i, side in ((1, "ad"), (2, "anomalib"))}}
        for metric in METRICS:
            both = [(ours[metric], theirs[metric]) for _, ours, theirs in pairs if metric in ours and metric in theirs]
            if not both:
                continue
            diffs = [a - b for a, b in both]
            entry[metric] = {"ad": mean_std([a for a, _ in both]), "anomalib": mean_std([b for _, b in both]),
                             "diff": mean_std(diffs), "diff_max": max(diffs, key=abs)}
        summary[name] = entry
    return summary


def table(summary: dict) -> str:
    """The summary as markdown: each metric's means, anomalib's spread and the paired difference."""
    lines = ["| method | runs | ad precision | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for name, entry in summary.items():
        cells = []
        for metric in METRICS:
            if metric not in entry:
                cells.append("—")
                continue
            m = entry[metric]
            cells.append(f"{m['ad'][0]:.3f} ±{m['ad'][1]:.3f} / {m['anomalib'][0]:.3f} ±{m['anomalib'][1]:.3f}; "
                         f"Δ {m['diff'][0]:+.3f} ± {m['diff'][1]:.3f} (max {m['diff_max']:+.3f})")
        lines.append(f"| {name} | {entry['runs']} | {entry['precision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    sys.path.insert(0, str(HERE))
    if args.report_only:  # save what finished in batches that are still running or were stopped
        seeds, categories = [int(s) for s in args.seeds.split(",")], args.categories.split(",")
        for name in args.methods.split(","):
            for side in ("ad", "anomalib"):
                harvest(Batch(name, METHODS[name], seeds, categories, work), side, None)
    else:
        run_all(args, work)
    summary = summarise(work, args.methods.split(","))
    print(table(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
