"""A speed tuning on and off, side by side: interleaved whole commands, wall and CPU time of each.

Each run is ``python -m ad.launch model=padim dataset=mvtec ... tracking=none`` in a fresh process on
a generated MVTec-layout category, with a fresh feature cache (cold) or one warmed by an untimed run
first (warm). "Off" is applied in every process of the run, the start-up prefetch included, by a
``sitecustomize`` this script writes: for ``png`` it makes ``imagecodecs`` unimportable, so Pillow
decodes every image, as it would with the dependency removed. Runs alternate on/off, off/on, ...;
CPU time is user + sys of the command and all its descendants (this process is their subreaper), far
less sensitive to a busy machine than wall time. The table gives the medians.

    python benchmarks/bench_tunings.py png --repeat 5
    python benchmarks/bench_tunings.py png --cache warm --source-size 256
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Written as sitecustomize.py for the "off" runs: what each tuning's absence looks like.
OFF = {
    "png": '''
import importlib.abc, sys

class _NoImagecodecs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "imagecodecs":
            raise ImportError("off for bench_tunings.py")

sys.meta_path.insert(0, _NoImagecodecs())
''',
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tuning", choices=sorted(OFF), help="the tuning to switch off in every other run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per side (default 5)")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold", help="feature cache state (default cold)")
    parser.add_argument("--model", default="padim")
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-test", type=int, default=40, help="test images, half of them defective")
    parser.add_argument("--source-size", type=int, default=900, help="generated PNG side in px (MVTec: 700-1024)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ad-bench-tunings"))
    parser.add_argument("--out", help="also write every run as JSON lines here")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> Path:
    """The generated category's root (cached under --work) and the "off" sitecustomize folder."""
    from ad.data.synthetic import make_mvtec_layout

    work = Path(args.work)
    root = work / f"data-{args.n_train}-{args.n_test}-{args.source_size}"
    if not (root / "bottle" / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_mvtec_layout(root, "bottle", n_train=args.n_train, n_test_good=args.n_test // 2,
                          n_test_defect=args.n_test - args.n_test // 2, image_size=args.source_size, seed=0)
        (root / "bottle" / ".complete").touch()
    site = work / f"off-{args.tuning}"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(OFF[args.tuning])
    return root


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reap_orphans() -> None:
    """Wait for descendants left behind (the prefetch side process), so their CPU time is counted."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def run_once(args: argparse.Namespace, root: Path, off: bool, tag: str) -> dict:
    """One whole command; its wall and CPU seconds and its metrics.json timings."""
    work = Path(args.work)
    run_dir, cache = work / "runs" / tag, work / "cache" / ("warm" if args.cache == "warm" else tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if off:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / f"off-{args.tuning}"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "ad.launch", f"model={args.model}", "dataset=mvtec", f"dataset.root={root}",
               "dataset.category=bottle", "backbone.weights=random", "tracking=none",
               f"runtime.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    load, cpu, start = os.getloadavg()[0], children_cpu(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    reap_orphans()
    if done.returncode:
        raise SystemExit(f"{tag} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if args.cache == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    return {"side": "off" if off else "on", "wall": wall, "cpu": children_cpu() - cpu, "load": load,
            "fit_test": metrics["fit_s"] + metrics["test_s"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned descendants are reparented to us
    root = prepare(args)
    if args.cache == "warm":
        shutil.rmtree(Path(args.work) / "cache" / "warm", ignore_errors=True)
        run_once(args, root, off=False, tag="warmup")
    rows = []
    for i in range(args.repeat):
        for off in ((False, True) if i % 2 == 0 else (True, False)):
            rows.append(run_once(args, root, off, f"{'off' if off else 'on'}-{i}"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "a") as file:
                    file.write(json.dumps(rows[-1]) + "\n")
    print(f"| {args.tuning} ({args.cache}) | wall s | CPU s | fit+test s | load |\n|---|---|---|---|---|")
    for side in ("on", "off"):
        mine = [row for row in rows if row["side"] == side]
        print(f"| {side} | " + " | ".join(f"{statistics.median(row[key] for row in mine):.2f}"
                                         for key in ("wall", "cpu", "fit_test", "load")) + " |")


if __name__ == "__main__":
    main()
