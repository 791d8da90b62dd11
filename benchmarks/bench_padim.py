"""Speed benchmark of ``ad``'s PaDiM against its compute floor and against anomalib.

One MVTec-sized category (by default generated with ``make_mvtec_layout``: 209 train + 83 test
images of 900 px PNG, like MVTec AD's bottle; or real data with ``--root DIR --category NAME``) is
run through:

1. the floor: the backbone's forward pass alone (resnet18 -> layer1..3) over the same images,
   preloaded as 256 px tensors, batch 32, inference mode; once as plain timm fp32 NCHW and once as
   ``ad.backbone.FeatureExtractor`` with the layout and precision the run uses;
2. ``python -m ad.launch model=padim dataset=mvtec ...``: fit + test seconds from its metrics.json
   and the wall time of the whole command, with default MLflow tracking (a temporary sqlite store)
   and with ``tracking=none``;
3. anomalib 2.x's PaDiM on the same images (``benchmarks/anomalib_padim.py``, run under the Python
   given by ``--anomalib-python``; skipped without it).

Each timing is repeated (``--repeat``) and the minimum is kept: on a shared machine the minimum is
the figure least disturbed by other work; the columns (floors included) are interleaved within each
repetition so that background load hits them alike. ``ad`` runs get a fresh ``$AD_CACHE_DIR`` (cold:
nothing decoded or extracted before), plus a warm re-run on that cache. Nothing is downloaded: both
libraries get the same randomly initialised resnet18 weights from one local file (``--weights random``
gives each its own random init instead).

    python benchmarks/bench_padim.py --quick
    python benchmarks/bench_padim.py --anomalib-python /tmp/anomalib-venv/bin/python --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BACKBONE, LAYERS, IMAGE_SIZE, BATCH = "resnet18", ["layer1", "layer2", "layer3"], 256, 32
#: The promises this benchmark checks.
TARGET_FLOOR_RATIO = 1.5  # ad fit+test <= 1.5x the backbone floor
TARGET_ANOMALIB_RATIO = 1 / 3  # ad whole command <= 1/3 of anomalib's
#: Environment of every timed subprocess: never reach a hub, never ask a terminal.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def publish(results: dict, report: str, out: str | None) -> dict:
    """Print the report (stdout holds only tables) and, with ``--out``, write the results as JSON."""
    print(report, flush=True)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        progress(f"results written to {out}")
    return results


def progress(message: str) -> None:
    """One line per step on stderr, so the table on stdout stays clean."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- configuration ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (default: generated MVTec-sized category)")
    data.add_argument("--root", help="folder holding MVTec-layout categories (real data); default: generate one")
    data.add_argument("--category", default="bottle", help="category folder under --root (default: bottle)")
    data.add_argument("--n-train", type=int, default=209, help="generated good training images (bottle: 209)")
    data.add_argument("--n-test-good", type=int, default=20, help="generated good test images (bottle: 20)")
    data.add_argument("--n-test-defect", type=int, default=63, help="generated defective test images (bottle: 63)")
    data.add_argument("--source-size", type=int, default=900, help="generated PNG side in px (bottle: 900)")
    data.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ad-bench-data"),
                      help="where generated categories are cached between runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke configuration: 20 train / 10 test images of 256 px, 1 repetition, no warm re-run")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per timing, minimum kept (default 3)")
    parser.add_argument("--weights", choices=("shared", "random"), default="shared",
                        help="shared: one random resnet18 file for both libraries; random: each its own init")
    parser.add_argument("--anomalib-python", help="Python of a venv with anomalib 2.x; omitted: no anomalib column")
    parser.add_argument("--anomalib-workers", type=int, default=None,
                        help="anomalib DataLoader workers (default: anomalib's own default)")
    parser.add_argument("--skip-mlflow", action="store_true", help="time only tracking=none")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-feature-cache re-run of ad")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders (printed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test_good, args.n_test_defect, args.source_size = 20, 4, 6, 256
        args.repeat, args.no_warm = args.repeat or 1, True
    args.repeat = args.repeat or 3
    return args


def ad_revision() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes): what exactly was measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ad", "conf")
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def machine_info() -> dict:
    """CPU model, core count, torch version and threads: the context every figure needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "isa": isa, "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "ad_revision": ad_revision(),
    }


# -- data ---------------------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace) -> tuple[Path, str]:
    """Return (root, category): the user's data, or a generated category cached under --data-dir."""
    if args.root:
        return Path(args.root).expanduser().resolve(), args.category
    from ad.data.synthetic import make_mvtec_layout

    name = f"{args.category}_{args.n_train}_{args.n_test_good}_{args.n_test_defect}_{args.source_size}"
    root = Path(args.data_dir).expanduser().resolve() / name
    done = root / args.category / ".complete"
    if not done.exists():
        progress(f"generating {args.n_train} train + {args.n_test_good + args.n_test_defect} test images "
                 f"of {args.source_size} px under {root} (once; cached)")
        shutil.rmtree(root, ignore_errors=True)
        make_mvtec_layout(root, args.category, n_train=args.n_train, n_test_good=args.n_test_good,
                          n_test_defect=args.n_test_defect, image_size=args.source_size, seed=0)
        done.touch()
    return root, args.category


def load_images(root: Path, category: str) -> tuple[torch.Tensor, int, int, str]:
    """All train and test images decoded and resized by ``ad``'s own reader: (N, 3, 256, 256) float32.

    Also returns the train and test counts and the files' pixel size(s) as text, e.g. "900×900 px".
    """
    from PIL import Image

    from ad.data import MVTecAD

    dataset = MVTecAD(root=str(root), category=category, image_size=IMAGE_SIZE)
    train, test = dataset.train_set(), dataset.test_set()
    images = [train[i]["image"] for i in range(len(train))] + [test[i]["image"] for i in range(len(test))]
    sizes = sorted({Image.open(s.image).size for s in [*dataset.train, *dataset.test]})
    source_px = ", ".join(f"{w}×{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "") + " px files"
    return torch.stack(images), len(dataset.train), len(dataset.test), source_px


def make_shared_weights(path: Path) -> Path:
    """A randomly initialised resnet18 state dict (seed 0) that both libraries load: same features."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(BACKBONE, pretrained=False).state_dict(), path)
    return path


# -- floor --------------------------------------------------------------------------------------


def run_trainer_settings() -> dict:
    """The trainer defaults the run uses (``conf/trainer/default.yaml``), resolved for this CPU."""
    from omegaconf import OmegaConf

    from ad.backbone import resolve_precision
    from ad.launch import CONF_DIR

    trainer = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")
    dtype = resolve_precision(str(trainer.precision), torch.device("cpu"))
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return {"precision": precision, "channels_last": bool(trainer.channels_last), "batch_size": int(trainer.batch_size),
            "keep_freed_memory": bool(runtime_settings().get("keep_freed_memory", False))}


def runtime_settings():
    """The ``runtime`` group's defaults, or the ``trainer`` group's where an older ``ad`` kept them there."""
    from omegaconf import OmegaConf

    from ad.launch import CONF_DIR

    folder = CONF_DIR / "runtime"
    return OmegaConf.load(folder / "default.yaml" if folder.is_dir() else CONF_DIR / "trainer" / "default.yaml")


def tune_allocator(settings: dict) -> bool:
    """Give the floors the malloc settings the run has (``runtime.keep_freed_memory``), so that both
    floors are measured without the page faults the run avoids: the floor stays the strictest one."""
    if not settings["keep_freed_memory"]:
        return False
    try:
        from ad.runtime.allocator import keep_freed_memory
    except ImportError:  # an older ad
        from ad.allocator import keep_freed_memory

    return keep_freed_memory()


@torch.inference_mode()
def time_pass(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Seconds to run ``model`` over all images in batches of 32 (one pass)."""
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        model(images[i:i + BATCH])
    return time.perf_counter() - start


@torch.inference_mode()
def floor_models(images: torch.Tensor, weights: Path | None, settings: dict) -> dict[str, torch.nn.Module]:
    """The two floor variants, built and warmed up (first-call allocations, oneDNN primitives).

    ``timm_fp32_nchw``: plain timm, fp32, default NCHW layout (the naive floor);
    ``ad_extractor``: ``ad.backbone.FeatureExtractor`` with the run's layout and precision.
    """
    import timm

    from ad.backbone import FeatureExtractor

    plain = timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=(1, 2, 3)).eval()
    if weights is not None:
        wanted = plain.state_dict().keys()  # the truncated model has no layer4 or fc
        plain.load_state_dict({k: v for k, v in torch.load(weights).items() if k in wanted}, strict=True)
    extractor = FeatureExtractor(BACKBONE, LAYERS, weights=str(weights) if weights else "random",
                                 precision=settings["precision"], channels_last=settings["channels_last"])
    models = {"timm_fp32_nchw": plain, "ad_extractor": extractor}
    for model in models.values():
        model(images[:BATCH])
    return models


# -- timed commands -----------------------------------------------------------------------------


#: Timed columns, in the order they run within a repetition.
COLUMNS = {
    "ad_mlflow": "ad run, default MLflow tracking, cold feature cache",
    "ad_none": "ad run, tracking=none, cold feature cache",
    "ad_none_warm": "ad run, tracking=none, warm feature cache (re-run of the previous)",
    "anomalib": "anomalib PaDiM run",
}


def ad_columns(args: argparse.Namespace) -> list[str]:
    """The ad columns to time: the warm-cache re-run only where the run has a feature cache."""
    columns = ["ad_none"] if args.skip_mlflow else ["ad_mlflow", "ad_none"]
    if has_feature_cache() and not args.no_warm:
        columns.append("ad_none_warm")
    return columns


def has_feature_cache() -> bool:
    """Whether this version of ``ad`` caches decoded images and features on disk (runtime.feature_cache)."""
    return bool(runtime_settings().get("feature_cache", False))


def timed(command: list[str], cwd: Path, log: Path, env: dict | None = None) -> float:
    """Run a command to completion, output to ``log``; return its wall seconds (start-up included)."""
    env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        start = time.perf_counter()
        code = subprocess.call(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {code}; last lines of {log}:\n{tail}")
    return wall


def run_ad(root: Path, category: str, weights: Path | None, tracking: str, work: Path, name: str,
           cache_dir: Path) -> dict:
    """One ``python -m ad.launch`` run; returns wall, fit and test seconds and its metrics.

    ``cache_dir`` becomes ``$AD_CACHE_DIR``: a fresh folder gives a cold run (nothing decoded or
    extracted before, the cache writes included), the folder of an earlier run a warm one.
    """
    run_dir = work / name
    command = [sys.executable, "-m", "ad.launch", "model=padim", "dataset=mvtec", f"dataset.root={root}",
               f"dataset.category={category}", f"backbone.weights={weights or 'random'}",
               f"hydra.run.dir={run_dir}"]
    if tracking == "none":
        command.append("tracking=none")
    else:  # default MLflow tracker, into a sqlite store in the (temporary) launch folder
        command.append(f"tracking.uri=sqlite:///{work / 'mlflow.db'}")
    wall = timed(command, cwd=work, log=work / f"{name}.log", env={"AD_CACHE_DIR": str(cache_dir)})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": wall, "fit_s": metrics["fit_s"], "test_s": metrics["test_s"],
            "image_AUROC": metrics.get("image_AUROC"), "pixel_AUROC": metrics.get("pixel_AUROC")}


def run_anomalib(python: str, root: Path, category: str, weights: Path | None, workers: int | None,
                 work: Path, rep: int) -> dict:
    """One run of ``anomalib_padim.py`` under anomalib's own Python (fresh process, like ad's)."""
    out = work / f"anomalib-{rep}.json"
    run_dir = work / f"anomalib-{rep}"
    run_dir.mkdir()
    command = [python, str(HERE / "anomalib_padim.py"), "--root", str(root), "--category", category,
               "--image-size", str(IMAGE_SIZE), "--batch-size", str(BATCH), "--out", str(out)]
    if weights is not None:
        command += ["--weights", str(weights)]
    if workers is not None:
        command += ["--workers", str(workers)]
    wall = timed(command, cwd=run_dir, log=work / f"anomalib-{rep}.log")
    result = json.loads(out.read_text())
    return {"wall_s": wall, **{k: result[k] for k in ("fit_s", "test_s", "import_s", "image_AUROC", "pixel_AUROC")
                                if k in result}, "versions": result.get("versions")}


def best_of(runs: list[dict]) -> dict:
    """Minimum of every timing over the repetitions (other fields from the first run); all runs kept."""
    best = dict(runs[0])
    for key in ("wall_s", "fit_s", "test_s", "import_s"):
        if key in best:
            best[key] = min(r[key] for r in runs)
    best["fit_test_s"] = min(r["fit_s"] + r["test_s"] for r in runs)
    best["runs"] = runs
    return best


# -- report -------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def secs(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "—"


#: Rows of the main table: (result key, label, detail) for fit+test and for the whole command.
FIT_TEST_ROWS = (
    ("ad_none", "ad fit+test (cold cache, tracking=none)", "fit {fit} + test {test}, from metrics.json"),
    ("ad_mlflow", "ad fit+test (cold cache, MLflow)", "fit {fit} + test {test}; MLflow working on its own thread"),
    ("ad_none_warm", "ad fit+test (warm feature cache)", "fit {fit} + test {test}; features read back from disk"),
    ("anomalib", "anomalib fit+test", "fit {fit} (train epoch + validation on the test images) + test {test}"),
)
WALL_ROWS = (
    ("ad_mlflow", "ad whole command, MLflow (default)", "start-up, data, fit, test, metrics, logging model + 8 panels"),
    ("ad_none", "ad whole command, tracking=none", "start-up, data, fit, test, metrics"),
    ("ad_none_warm", "ad whole command, tracking=none, warm cache", "the same command run again"),
    ("anomalib", "anomalib whole command", "imports {imports}, fit, test, checkpoint, visualizations"),
)


def format_report(r: dict) -> str:
    """The markdown tables printed at the end, with the machine and data lines above them."""
    m, floors, d = r["machine"], r["floor"], r["data"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), torch {m['torch']}, "
            f"{m['threads']} threads, Python {m['python']}; load average at start {m['load_avg_at_start']}; "
            f"ad {m['ad_revision']}.\n"
            f"Data: {d['root']}/{d['category']}: {d['n_train']} train + {d['n_test']} test images "
            f"({d['source_px']}), resized to {IMAGE_SIZE} px; backbone weights: {r['weights']}.\n"
            f"Seconds; each the minimum of {r['repeat']} repetition(s) (shared, noisy machine).\n")
    ft, fa = floors["timm_fp32_nchw_s"], floors["ad_extractor_s"]
    st = floors["settings"]
    lines = ["| what | seconds | × timm floor | × ad floor | detail |", "|---|---|---|---|---|",
             f"| floor: timm resnet18→layer3, fp32 NCHW | {secs(ft)} | 1.00× | {ratio(ft, fa)} | "
             f"{r['n_images']} preloaded 256 px tensors, batch {BATCH} |",
             f"| floor: ad FeatureExtractor | {secs(fa)} | {ratio(fa, ft)} | 1.00× | as the run uses it: "
             f"{st['precision']}, channels_last={st['channels_last']} |"]
    if st.get("keep_freed_memory"):
        head += "Both floors ran with the run's malloc setting (runtime.keep_freed_memory: no page faults per batch).\n"
    for key, label, detail in FIT_TEST_ROWS:
        if key in r:
            x = r[key]
            text = detail.format(fit=secs(x["fit_s"]), test=secs(x["test_s"]))
            lines.append(f"| {label} | {secs(x['fit_test_s'])} | {ratio(x['fit_test_s'], ft)} | "
                         f"{ratio(x['fit_test_s'], fa)} | {text} |")
    for key, label, detail in WALL_ROWS:
        if key in r:
            x = r[key]
            text = detail.format(imports=secs(x.get("import_s")))
            lines.append(f"| {label} | {secs(x['wall_s'])} | {ratio(x['wall_s'], ft)} | {ratio(x['wall_s'], fa)} "
                         f"| {text} |")
    lines += ["", "| promise | measured | target | met |", "|---|---|---|---|"]
    for name, (value, target) in r["promises"].items():
        met = "—" if value is None else ("yes" if value <= target else "NO")
        lines.append(f"| {name} | {'—' if value is None else f'{value:.2f}'} | ≤ {target:.2f} | {met} |")
    if (spread := per_repetition(r)) is not None:
        lines.append(spread)
    if "anomalib" in r:
        lines.append(f"\nanomalib versions: {r['anomalib'].get('versions')}")
    sanity = [f"{k}: image AUROC {r[k]['image_AUROC']:.3f}, pixel AUROC {r[k]['pixel_AUROC']:.3f}"
              for k in ("ad_none", "anomalib") if k in r and r[k].get("pixel_AUROC") is not None]
    if sanity:
        lines.append("Sanity check (same images, same weights): " + "; ".join(sanity))
    return head + "\n" + "\n".join(lines)


def per_repetition(r: dict) -> str | None:
    """ad fit+test over the ad floor of the same repetition, for each repetition: the minima above can
    come from different repetitions, and this shows how far one run strays from another."""
    floors = [run["wall_s"] for run in r["floor"]["runs"].get("ad_extractor", [])]
    parts = []
    for key, label in (("ad_none", "tracking=none"), ("ad_mlflow", "MLflow")):
        if key in r and floors:
            runs = zip(r[key]["runs"], floors, strict=False)
            ratios = [(run["fit_s"] + run["test_s"]) / floor for run, floor in runs]
            parts.append(f"{label} {', '.join(f'{v:.2f}' for v in ratios)} (median {statistics.median(ratios):.2f})")
    return "Per repetition, ad fit+test / ad floor: " + "; ".join(parts) if parts else None


def promises(r: dict) -> dict:
    """The ratios the project promises, as {name: (measured or None, target)}."""
    fit_test = r.get("ad_none", r.get("ad_mlflow", {})).get("fit_test_s")
    out = {}
    for key, label in (("timm_fp32_nchw_s", "timm fp32"), ("ad_extractor_s", "ad extractor")):
        out[f"ad fit+test / floor ({label})"] = (fit_test / r["floor"][key] if fit_test else None, TARGET_FLOOR_RATIO)
    if "anomalib" in r:
        for key, label in (("ad_mlflow", "MLflow"), ("ad_none", "tracking=none")):
            if key in r:
                out[f"ad whole command ({label}) / anomalib whole command"] = (
                    r[key]["wall_s"] / r["anomalib"]["wall_s"], TARGET_ANOMALIB_RATIO)
    return out


# -- main ---------------------------------------------------------------------------------------


def time_repetition(rep: int, args: argparse.Namespace, runs: dict[str, list[dict]], floors: dict,
                    images: torch.Tensor, root: Path, category: str, weights: Path | None, work: Path) -> None:
    """One repetition of every column, appended to ``runs``: interleaving them makes background load
    on a shared machine hit every column alike."""
    for name, model in floors.items():
        progress(f"[{rep + 1}/{args.repeat}] floor: {name} over {len(images)} images")
        runs[name].append({"wall_s": time_pass(model, images), "load_avg": os.getloadavg()[0]})
    for key in (k for k in runs if k not in floors):
        progress(f"[{rep + 1}/{args.repeat}] {COLUMNS[key]}")
        if key == "anomalib":
            result = run_anomalib(args.anomalib_python, root, category, weights, args.anomalib_workers, work, rep)
        else:
            tracking = "none" if key.startswith("ad_none") else "mlflow"
            cache = work / f"cache-{tracking}-{rep}"  # fresh: cold; the warm run reuses the cold none run's
            result = run_ad(root, category, weights, tracking, work, f"{key}-{rep}", cache)
        runs[key].append({**result, "load_avg": os.getloadavg()[0]})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict = {"machine": machine_info(), "repeat": args.repeat, "weights": args.weights}
    progress(f"machine: {results['machine']}")
    root, category = prepare_data(args)
    work = Path(tempfile.mkdtemp(prefix="ad-bench-"))
    try:
        weights = make_shared_weights(work / "resnet18_random.pth") if args.weights == "shared" else None
        progress("decoding images to 256 px tensors for the floor")
        images, n_train, n_test, source_px = load_images(root, category)
        results["data"] = {"root": str(root), "category": category, "n_train": n_train, "n_test": n_test,
                           "source_px": source_px}
        results["n_images"] = len(images)
        settings = run_trainer_settings()
        settings["keep_freed_memory"] = tune_allocator(settings)
        floors = floor_models(images, weights, settings)

        columns = [*floors, *ad_columns(args), *(["anomalib"] if args.anomalib_python else [])]
        runs: dict[str, list[dict]] = {key: [] for key in columns}
        for rep in range(args.repeat):
            time_repetition(rep, args, runs, floors, images, root, category, weights, work)
        floor_runs = {name: runs.pop(name) for name in floors}
        results["floor"] = {"settings": settings, "runs": floor_runs,
                            **{f"{name}_s": min(r["wall_s"] for r in floor_runs[name]) for name in floors}}
        results.update({key: best_of(value) for key, value in runs.items()})
        results["promises"] = promises(results)
    finally:
        if args.keep:
            progress(f"run folders kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    return publish(results, format_report(results), args.out)


if __name__ == "__main__":
    main()
