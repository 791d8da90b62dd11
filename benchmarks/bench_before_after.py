"""PaDiM and PatchCore fit+test of two source trees side by side: a refactor must keep them within 5%.

    git worktree add /tmp/before 9b20d2b^      # the tree before the structure work
    python benchmarks/bench_before_after.py --before /tmp/before --repeat 3

Each repetition runs both trees' ``python -m ad.launch model=X tracking=none`` in fresh processes,
alternating which goes first, with the feature cache and prefetch off (so every run decodes and
extracts), and reads fit_s and test_s from metrics.json; CPU seconds (user + system of the process
and its children) are reported beside wall time, since on a shared machine they move far less.
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

ROOT = Path(__file__).resolve().parents[1]
#: The cache switches moved from the trainer group to the runtime group with the structure work.
NO_CACHE = {"before": ["trainer.feature_cache=false", "trainer.prefetch=false"],
            "after": ["runtime.feature_cache=false", "runtime.prefetch=false"]}


def one_run(tree: Path, side: str, model: str) -> dict:
    """One whole command of ``tree``: its fit and test seconds, wall and CPU seconds, image AUROC."""
    out = tempfile.mkdtemp(prefix=f"before-after-{side}-")
    cmd = [sys.executable, "-m", "ad.launch", f"model={model}", "tracking=none", f"hydra.run.dir={out}",
           *NO_CACHE[side]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=out, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{side} {model} failed: {done.stderr[-2000:]}")
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {"side": side, "model": model, "fit_test": metrics["fit_s"] + metrics["test_s"], "wall": wall,
            "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
            "image_AUROC": metrics.get("image_AUROC"), "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the earlier commit")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--models", default="padim,patchcore")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="every run as JSON")
    args = parser.parse_args()
    trees = {"before": args.before, "after": args.after}
    rows = []
    for r in range(args.repeat):
        for model in args.models.split(","):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                rows.append(one_run(trees[side], side, model))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print("| model | side | fit+test s (median) | wall s | CPU s | image AUROC | load |\n|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for side in trees:
            runs = [row for row in rows if row["model"] == model and row["side"] == side]
            med = {k: statistics.median(row[k] for row in runs) for k in ("fit_test", "wall", "cpu", "load")}
            print(f"| {model} | {side} | {med['fit_test']:.2f} | {med['wall']:.1f} | {med['cpu']:.1f} | "
                  f"{runs[0]['image_AUROC']:.4f} | {med['load']:.1f} |")


if __name__ == "__main__":
    main()
