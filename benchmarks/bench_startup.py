"""Whole-command time of ``python -m ad.launch``, cold and warm, for two source trees side by side.

What a user waits for is the whole process: interpreter start, imports, the run, writing results
and exit. Each scenario runs in its own fresh folder (working directory, so a fresh MLflow store,
and ``$AD_CACHE_DIR``, so an empty feature cache): the first run there is *cold*, the next ones
*warm* (the same command again, finding the cached images and features). Two source trees (the
checkout and ``--old``, e.g. a ``git worktree`` of an earlier commit) run in the same virtual
environment through ``PYTHONPATH``, interleaved run by run, the first tree alternating.

Wall time is sensitive to other load on the machine; CPU time (user + system of the command and
its children, from ``getrusage``) much less, so both are reported, with the load average.
``-X importtime`` of ``import ad.run`` is summarised per tree as well.

    git worktree add /tmp/ad-old <commit>
    python benchmarks/bench_startup.py --old /tmp/ad-old --repeat 3 --out startup.json
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
#: name -> overrides of ``python -m ad.launch`` (the data folder is added to each). Random weights asked
#: for explicitly: offline, the default ImageNet request falls back to them with a warning, and such a
#: build is not recorded for recall (the next run may find the weights), unlike ImageNet weights in the
#: Hugging Face cache, a weights file or random weights asked for, whose builds cost the same.
SCENARIOS = {
    "PaDiM, MLflow": ["backbone.weights=random"],
    "PaDiM, tracking=none": ["tracking=none", "backbone.weights=random"],
    "PatchCore, tracking=none": ["model=patchcore", "tracking=none", "backbone.weights=random"],
}
#: top-level packages whose import time the summary lists (torchvision's share is mostly torch._dynamo)
PACKAGES = ("torch", "timm", "torchvision", "torch._dynamo", "torchmetrics", "scipy", "kornia", "hydra", "ad")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Run ``cmd``; its wall and CPU seconds, the load average before it, and its exit status."""
    load = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
    return {"wall": wall, "cpu": cpu, "load": load, "rc": proc.returncode, "leaked": "nanobind: leaked" in proc.stdout}


def tree_env(tree: Path, cache: Path) -> dict:
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(tree), "AD_CACHE_DIR": str(cache)}


def run_once(tree: Path, scenario: list[str], folder: Path, name: str, data: Path) -> dict:
    """One whole command in ``folder`` (its MLflow store and cache); adds metrics.json's timings."""
    run_dir = folder / name
    cmd = [sys.executable, "-m", "ad.launch", *scenario, f"dataset.root={data}", f"hydra.run.dir={run_dir}"]
    result = timed(cmd, folder, tree_env(tree, folder / "cache"))
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        found = json.loads(metrics.read_text())
        found = found.get("results", found)
        result.update({k: found.get(k) for k in ("total_s", "fit_s", "test_s")})
    return result


def import_summary(tree: Path, scratch: Path) -> dict:
    """Cumulative seconds of ``import ad.run`` and of the first import of each of ``PACKAGES``, from -X importtime."""
    env = tree_env(tree, scratch / "cache")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ad.run"], cwd=scratch, env=env,
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, check=True)
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "[us]" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            name = name.strip()
            if name in PACKAGES or name == "ad.run":
                found[name] = int(cumulative) / 1e6
    return found


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="source tree to compare with (a git worktree of a commit)")
    parser.add_argument("--new", default=str(REPO), help="source tree of the new side (default: this checkout)")
    parser.add_argument("--repeat", type=int, default=3, help="cold and warm runs per scenario and tree")
    parser.add_argument("--cold-patchcore", type=int, default=1,
                        help="cold PatchCore runs per tree (each fits the backbone on every image: slow)")
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "ad-bench-startup"))
    parser.add_argument("--out", help="also write every run as JSON here")
    args = parser.parse_args(argv)
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    data = scratch / "data"
    scratch.mkdir(parents=True)
    # generate the built-in dataset once, untimed, so cold runs differ only in caches and stores
    run_once(trees["new"], ["tracking=none"], scratch, "generate", data)

    runs: list[dict] = []
    imports: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.repeat):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            imports[name].append(import_summary(trees[name], scratch))
        for scenario, overrides in SCENARIOS.items():
            patchcore = "model=patchcore" in overrides
            for name in order:
                if patchcore and r >= args.cold_patchcore:  # its warm runs reuse the last cold run's folder
                    continue
                folder = scratch / f"{r}-{name}-{len(runs)}"
                folder.mkdir()
                runs.append({"scenario": scenario, "tree": name, "kind": "cold", "folder": str(folder),
                             **run_once(trees[name], overrides, folder, f"cold-{r}", data)})
                print(json.dumps(runs[-1]), flush=True)
            for name in order:
                folder = next(Path(x["folder"]) for x in reversed(runs) if x["scenario"] == scenario
                              and x["tree"] == name and x["kind"] == "cold")
                runs.append({"scenario": scenario, "tree": name, "kind": "warm", "folder": str(folder),
                             **run_once(trees[name], overrides, folder, f"warm-{r}", data)})
                print(json.dumps(runs[-1]), flush=True)

    print("\n| scenario | run | tree | n | wall s (median) | CPU s (median) | total_s | fit_s | test_s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        for kind in ("cold", "warm"):
            for name in trees:
                rows = [x for x in runs if (x["scenario"], x["kind"], x["tree"]) == (scenario, kind, name)]
                loads = [x["load"] for x in rows]
                cells = [median(rows, key) for key in ("wall", "cpu", "total_s", "fit_s", "test_s")]
                print(f"| {scenario} | {kind} | {name} | {len(rows)} | " + " | ".join(map(str, cells))
                      + f" | {min(loads):.1f}–{max(loads):.1f} |")
    print("\n`import ad.run`, cumulative seconds (median over the repeats):")
    for name, found in imports.items():
        keys = ["ad.run", *[k for k in PACKAGES if any(k in f for f in found)]]
        cells = [f"{k} {statistics.median(f.get(k, 0.0) for f in found):.2f}" for k in keys]
        print(f"  {name}: " + ", ".join(cells))
    failed = [x for x in runs if x["rc"] != 0]
    leaked = [x for x in runs if x["leaked"]]
    print(f"\n{len(failed)} failed runs; {len(leaked)} printed 'nanobind: leaked'")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "imports": imports}, indent=1))


if __name__ == "__main__":
    main()
