"""Score new images with a fitted model: ``python -m ad.predict BUNDLE INPUT... [--out DIR]``.

``BUNDLE`` is a run folder, its ``model/`` folder, an MLflow run id / ``runs:/`` / ``models:/`` URI, or a
detector exported by ``ad.export`` (``.onnx``, run by ONNX Runtime; OpenVINO ``.xml``), scored without torch;
``INPUT`` are images, folders (searched recursively) or glob patterns. Writes ``DIR/predictions.csv``
(path, score, label and, for methods with maps, the flagged share of the image) and with
``--save-maps`` an overlay panel and a binary mask per image. Images are read, resized and
normalised exactly as the run did, so scores equal the run's own.

Exit status: 0 all scored, 1 some images could not be read (named on stderr; the rest are scored),
2 nothing could be scored (a bad bundle, no images).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ad.errors import ADError, one_line, one_line_errors

log = logging.getLogger("ad.predict")

#: Default parent of ``--out``: one folder per call, named by its time.
DEFAULT_OUT = Path("outputs/predictions")


@dataclass
class Scored:
    """One batch's results, in input order."""

    paths: list[Path]
    scores: np.ndarray
    maps: np.ndarray | None
    images: np.ndarray  # uint8 (B, S, S, 3), as the model saw them


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Images named, inside folders (recursively) or matched by globs, in the order given, each once."""
    from ad.data.io import IMAGE_EXTENSIONS, is_image_file

    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not matches:
                raise ADError(f"{path}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.exists():
            matches = [path]
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if is_image_file(Path(p)))
            if not matches:
                raise ADError(f"{item}: no images match this pattern")
        else:
            raise ADError(f"{path}: no such file or folder")
        found.extend(matches)
    return list(dict.fromkeys(found))


def resolve_bundle(reference: str, scratch: Path) -> Path:
    """A local bundle folder for a path, or for an MLflow run id / URI (its artifacts downloaded to ``scratch``)."""
    from ad.bundle import METADATA, find_bundle

    path = Path(reference).expanduser()
    if path.exists() or not looks_like_mlflow(reference):
        return find_bundle(path)
    import mlflow

    try:
        uri = reference if ":/" in reference else logged_model_uri(reference)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    except ADError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a missing run or model
        raise ADError(f"{reference}: cannot fetch this MLflow model ({one_line(exc)[:200]}); "
                      f"check the run id and MLFLOW_TRACKING_URI") from None
    found = sorted(local.rglob(METADATA))
    if not found:
        raise ADError(f"{reference}: the MLflow model holds no ad bundle ({METADATA})")
    return found[0].parent


def logged_model_uri(run_id: str) -> str:
    """The ``models:/`` URI of the model an MLflow run logged."""
    import mlflow

    run = mlflow.get_run(run_id)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise ADError(f"{run_id}: this MLflow run logged no model (tracking.log_model was off); "
                      f"use its run folder instead")
    return f"models:/{models[0].model_id}"


def looks_like_mlflow(reference: str) -> bool:
    """An MLflow run id (32 hex digits) or a runs:/ or models:/ URI."""
    is_run_id = len(reference) == 32 and all(c in "0123456789abcdef" for c in reference)
    return is_run_id or reference.startswith(("runs:/", "models:/"))


def read_images(paths: list[Path], size: int) -> tuple[list[Path], list[np.ndarray], list[str]]:
    """Decode and resize images on every core; unreadable ones are reported, not fatal."""
    from ad.data.io import read_image
    from ad.threads import map_on_cores

    def attempt(path: Path) -> np.ndarray | str:
        try:
            return read_image(path, size)
        except ADError as exc:
            return str(exc)
        except OSError as exc:
            return f"{path}: cannot read ({exc.strerror or exc})"

    good, images, errors = [], [], []
    for path, result in zip(paths, map_on_cores(attempt, paths, name="ad-read"), strict=True):
        if isinstance(result, str):
            errors.append(result)
        else:
            good.append(path)
            images.append(result)
    return good, images, errors


def score_images(bundle, images: np.ndarray, device) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (B,) and maps (B, S, S) of uint8 (B, S, S, 3) images at the bundle's size (or an exported detector's)."""
    if hasattr(bundle, "score"):  # ad.export.runtime.ExportedDetector: its own runtime, no torch
        return bundle.score(images)
    import torch

    from ad.data.tensors import normalize_batch

    with torch.inference_mode():
        prediction = bundle.model(normalize_batch(images).to(device))
    maps = prediction.maps.float().cpu().numpy() if prediction.maps is not None else None
    return prediction.scores.float().cpu().numpy(), maps


def score_paths(bundle, paths: list[Path], batch_size: int, device, errors: list[str]) -> Iterator[Scored]:
    """Batches of scored images; unreadable ones are appended to ``errors`` and skipped."""
    from tqdm import tqdm

    with tqdm(total=len(paths), unit="image", desc="predict", disable=None, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            good, images, failed = read_images(chunk, bundle.image_size)
            errors.extend(failed)
            if good:
                stacked = np.stack(images)
                scores, maps = score_images(bundle, stacked, device)
                yield Scored(good, scores, maps, stacked)
            bar.update(len(chunk))


def save_panels(out: Path, scored: Scored, threshold: float | None, pixel_threshold: float | None,
                colour_range: tuple[float, float] | None) -> None:
    """Per image: an overlay panel (image | heat map, flagged region outlined) and the binary mask."""
    from PIL import Image

    from ad.visualize import overlay_panel

    for i, path in enumerate(scored.paths):
        anomaly_map = scored.maps[i]
        mask = anomaly_map >= pixel_threshold if pixel_threshold is not None else None
        vmin, vmax = colour_range or (float(anomaly_map.min()), float(anomaly_map.max()))
        flagged = "" if threshold is None else (" · ANOMALOUS" if scored.scores[i] >= threshold else " · normal")
        panel = overlay_panel(scored.images[i], anomaly_map, mask, vmin, vmax,
                              title=f"{path.name} · score {scored.scores[i]:.4g}{flagged}")
        name = unique_stem(path)
        Image.fromarray(panel).save(out / "maps" / f"{name}.png")
        if mask is not None:
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")


def unique_stem(path: Path) -> str:
    """A file name for an input's outputs that stays unique across folders (parent folder name + stem)."""
    return f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem


def colour_scale(bundle) -> tuple[float, float] | None:
    """A fixed heat-map range for every image: the good maps' floor to twice the pixel threshold's height above it."""
    pixel = bundle.meta["thresholds"].get("pixel") or {}
    floor, threshold = pixel.get("lowest"), bundle.pixel_threshold
    if floor is None or threshold is None or threshold <= floor:
        return None
    return float(floor), float(floor + 2 * (threshold - floor))


def is_exported(reference: str) -> bool:
    """An exported detector file (``ad.export``): ``.onnx`` or OpenVINO ``.xml``."""
    return Path(reference).suffix in (".onnx", ".xml")


def load_scorer(bundle_ref: str, device: str):
    """The bundle (torch, on ``device``) or exported detector (its runtime, CPU) that ``bundle_ref`` names."""
    if is_exported(bundle_ref):
        from ad.export.runtime import load_exported

        return load_exported(bundle_ref), None
    import torch

    from ad.bundle import load_bundle

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ADError("--device: cuda was requested but no CUDA GPU is available; use --device auto")
    with tempfile.TemporaryDirectory(prefix="ad-bundle-") as scratch:
        return load_bundle(resolve_bundle(bundle_ref, Path(scratch)), device), torch.device(device)


def predict(bundle_ref: str, inputs: list[str], out: Path | None = None, threshold: float | None = None,
            save_maps: bool = False, device: str = "auto", batch_size: int = 32) -> tuple[Path, dict]:
    """Score ``inputs`` with a bundle; returns the output folder and a summary. Raises ADError on bad input."""
    from ad.predictions import FILE, labels_at, write_predictions

    paths = expand_inputs(inputs)  # everything checkable is checked before the model loads
    bundle, device = load_scorer(bundle_ref, device)
    image_threshold = bundle.image_threshold if threshold is None else float(threshold)
    maps_wanted = bundle.produces_maps
    out = Path(out) if out is not None else DEFAULT_OUT / time.strftime("%Y-%m-%d_%H-%M-%S")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if save_maps and maps_wanted:
        (staging / "maps").mkdir()
        if bundle.pixel_threshold is not None:
            (staging / "masks").mkdir()
    errors: list[str] = []
    columns: dict[str, list] = {"path": [], "score": []}
    areas: list[float] = []
    try:
        for scored in score_paths(bundle, paths, batch_size, device, errors):
            columns["path"] += [str(p) for p in scored.paths]
            columns["score"] += scored.scores.tolist()
            if scored.maps is not None and bundle.pixel_threshold is not None:
                areas += (scored.maps >= bundle.pixel_threshold).mean(axis=(1, 2)).tolist()
            if save_maps and scored.maps is not None:
                save_panels(staging, scored, image_threshold, bundle.pixel_threshold, colour_scale(bundle))
        if not columns["path"]:
            raise ADError(f"none of the {len(paths)} images could be read; first error: {errors[0]}")
        columns["label"] = labels_at(np.array(columns["score"]), image_threshold)
        if areas:
            columns["anomalous_area"] = areas
        write_predictions(staging / FILE, columns)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    flagged = sum(1 for label in columns["label"] if label == 1)
    summary = {"scored": len(columns["path"]), "flagged": flagged if image_threshold is not None else None,
               "failed": len(errors), "errors": errors, "threshold": image_threshold}
    return out, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ad-predict", description="Score new images with a fitted ad model and flag the anomalous ones.",
        epilog="examples:\n  ad-predict outputs/runs/2026-12-06_10-00-00_padim new_parts/\n"
               "  ad-predict 3f2a...e1 'line2/*.png' --save-maps --out flagged/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="run folder, its model/ folder, an MLflow run id / runs:/ or models:/ URI, "
                        "or a detector exported by ad.export (.onnx, OpenVINO .xml)")
    parser.add_argument("inputs", nargs="+", help="images, folders (searched recursively) or glob patterns")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/predictions/<time>/)")
    parser.add_argument("--threshold", type=float, help="image threshold to flag at, instead of the bundle's")
    parser.add_argument("--save-maps", action="store_true", help="write an overlay panel and a mask per image")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=32, help="images scored together (default 32)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core); 1 can be "
                        "faster on a machine busy with other work")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours is the one bar shown
    if args.threads is not None:  # the command owns its process, as ad.launch does through ad.runtime
        from ad.runtime.threads import set_threads

        set_threads(args.threads)
    out, summary = predict(args.bundle, args.inputs, args.out, args.threshold, args.save_maps,
                           args.device, args.batch_size)
    for error in summary["errors"]:
        print(f"error: {error}", file=sys.stderr)
    flagged = ("no threshold: scores only" if summary["flagged"] is None
               else f"{summary['flagged']} flagged anomalous (threshold {summary['threshold']:.6g})")
    failed = f", {summary['failed']} unreadable" if summary["failed"] else ""
    print(f"{summary['scored']} images scored, {flagged}{failed}: {out / 'predictions.csv'}", flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
