"""The PaDiM whole command on an idle machine and on a busy one, with and without MLflow tracking.

"Busy" means what a shared workstation or CI runner sees: as many CPU-bound processes as there are
cores, plus one, at normal priority and in the benchmark's own session (so they share its
scheduling group), running for the whole command. A run that waits on low-priority work of its
own stalls for as long as such load lasts; this benchmark shows whether ``ad`` does.

Every run is ``python -m ad.launch model=padim dataset=mvtec ...`` on a generated MVTec-layout
category (the data of ``bench_padim.py``), cold (a fresh ``$AD_CACHE_DIR``); the table gives the
wall time of the command, its ``total_s``, ``fit_s`` and ``test_s`` from metrics.json, and the
loaded wall time over the idle one. A run still going after ``--timeout`` seconds is stopped and
reported as such.

    python benchmarks/bench_loaded.py --quick
    python benchmarks/bench_loaded.py --repeat 3 --out loaded.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench_padim import OFFLINE_ENV, machine_info, make_shared_weights, prepare_data, progress

#: One CPU-bound process of the load: spins until its deadline (argv[1], seconds), whatever happens to us.
SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
#: A fixed piece of plain single-threaded CPU work: the slowdown the load gives any process of this session.
REFERENCE = "for _ in range(30_000_000):\n    pass\n"
TRACKINGS = ("mlflow", "none")
LOADS = ("idle", "loaded")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="20 train / 10 test images of 256 px (bench_padim.py --quick's data), 1 repetition")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions, minimum kept (default 3; --quick 1)")
    parser.add_argument("--busy", type=int, default=(os.cpu_count() or 1) + 1,
                        help="CPU-bound processes of the load (default: cores + 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds after which a run counts as stalled")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ad-bench-data"),
                        help="where generated categories are cached between runs")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    # the data of bench_padim.py (its prepare_data reads these fields)
    args.root, args.category = None, "bottle"
    args.n_train, args.n_test_good, args.n_test_defect, args.source_size = 209, 20, 63, 900
    if args.quick:
        args.n_train, args.n_test_good, args.n_test_defect, args.source_size = 20, 4, 6, 256
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


@contextlib.contextmanager
def busy(count: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """``count`` CPU-bound processes at normal priority in this session, stopped when the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def run_ad(root: Path, category: str, weights: Path, tracking: str, work: Path, name: str,
           timeout: float) -> dict:
    """One cold ``python -m ad.launch`` PaDiM run: wall seconds and metrics.json's timings, or stalled."""
    run_dir = work / name
    command = [sys.executable, "-m", "ad.launch", "model=padim", "dataset=mvtec", f"dataset.root={root}",
               f"dataset.category={category}", f"backbone.weights={weights}", f"hydra.run.dir={run_dir}"]
    command.append("tracking=none" if tracking == "none" else f"tracking.uri=sqlite:///{work / name}.db")
    env = {**os.environ, **OFFLINE_ENV, "AD_CACHE_DIR": str(work / f"cache-{name}")}
    env.pop("MLFLOW_TRACKING_URI", None)
    with (work / f"{name}.log").open("w") as log:
        start = time.perf_counter()
        # in this session, beside the load: with the kernel's session autogroups, a command in a session of
        # its own would get half the CPU whatever the load, and hide what niceness does inside it
        process = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return {"wall_s": None, "stalled_after_s": timeout}
        wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join((work / f"{name}.log").read_text().splitlines()[-25:])
        raise RuntimeError(f"{name} exited {code}:\n{tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": round(wall, 3), **{k: metrics.get(k) for k in ("total_s", "fit_s", "test_s")}}


def reference_seconds() -> float:
    """Wall seconds of ``REFERENCE`` in a fresh process of this session."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", REFERENCE], check=True)
    return round(time.perf_counter() - start, 3)


def best(runs: list[dict]) -> dict:
    """The repetition with the shortest wall time (a stalled one only when all stalled)."""
    finished = [r for r in runs if r["wall_s"] is not None]
    return min(finished, key=lambda r: r["wall_s"]) if finished else runs[0]


def secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_report(r: dict) -> str:
    m, d = r["machine"], r["data"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}; "
            f"load average at start {m['load_avg_at_start']}; ad {m['ad_revision']}.\n"
            f"Data: {d['n_train']} train + {d['n_test']} test images of {d['source_px']} px, cold cache; "
            f"load: {r['busy']} CPU-bound processes at normal priority in the same session.\n"
            f"Seconds; each the fastest of {r['repeat']} repetition(s).\n")
    ref = r["reference"]
    head += (f"The same load slows plain single-threaded CPU work {ref['loaded_s'] / ref['idle_s']:.2f}× "
             f"({ref['idle_s']:.2f} -> {ref['loaded_s']:.2f} s): the fair share a process of this session gets.\n")
    lines = ["| PaDiM whole command | machine | wall | total_s | fit_s | test_s | loaded / idle |",
             "|---|---|---|---|---|---|---|"]
    for tracking in TRACKINGS:
        idle = r[tracking]["idle"]["wall_s"]
        for load in LOADS:
            x = r[tracking][load]
            wall = secs(x["wall_s"]) if x["wall_s"] is not None else f"> {x['stalled_after_s']:.0f} (stopped)"
            slow = "" if load == "idle" else (
                f"{x['wall_s'] / idle:.2f}×" if x["wall_s"] and idle else "stalled")
            label = "MLflow (default)" if tracking == "mlflow" else "tracking=none"
            lines.append(f"| {label} | {load} | {wall} | {secs(x.get('total_s'))} | {secs(x.get('fit_s'))} "
                         f"| {secs(x.get('test_s'))} | {slow} |")
    return head + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict = {"machine": machine_info(), "repeat": args.repeat, "busy": args.busy}
    root, category = prepare_data(args)
    results["data"] = {"n_train": args.n_train, "n_test": args.n_test_good + args.n_test_defect,
                       "source_px": args.source_size}
    work = Path(tempfile.mkdtemp(prefix="ad-bench-loaded-"))
    runs: dict = {tracking: {load: [] for load in LOADS} for tracking in TRACKINGS}
    references: dict = {load: [] for load in LOADS}
    try:
        weights = make_shared_weights(work / "resnet18_random.pth")
        for rep in range(args.repeat):
            for load in LOADS:  # interleaved, so that other work on a shared machine hits every column alike
                for tracking in TRACKINGS:
                    name = f"{tracking}-{load}-{rep}"
                    progress(f"[{rep + 1}/{args.repeat}] {load}, tracking={tracking}")
                    with busy(args.busy if load == "loaded" else 0, args.timeout + 60):
                        references[load].append(reference_seconds())
                        result = run_ad(root, category, weights, tracking, work, name, args.timeout)
                    runs[tracking][load].append({**result, "load_avg": os.getloadavg()[0]})
                    progress(f"    {result}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["reference"] = {f"{load}_s": min(references[load]) for load in LOADS}
    results["reference"]["runs"] = references
    for tracking in TRACKINGS:
        results[tracking] = {load: {**best(runs[tracking][load]), "runs": runs[tracking][load]} for load in LOADS}
    report = format_report(results)
    print(report, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
