"""One experiment, start to finish: dataset -> fit -> score -> metrics -> metrics.json + tracking.

``run(cfg, run_dir)`` is a plain function of the composed config, so tests and other entry points
call it without Hydra's command line. Results are written only once everything succeeded; a
failure marks the tracking run FAILED (never left RUNNING) and re-raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import ad
from ad.backbone import BackboneSpec, resolve_precision
from ad.bundle import run_meta, save_bundle
from ad.cache import DiskCache
from ad.checkpoints import (
    check_checkpoint,
    checkpoint_run_id,
    find_checkpoint,
    load_checkpoint,
    requeued_checkpoint,
)
from ad.data import collate, denormalize
from ad.errors import ADError, ConfigError, one_line, out_of_space
from ad.metrics import compute_metrics, operating_point_metrics
from ad.models import AnomalyModel
from ad.models.base import TrainableModel
from ad.predictions import FILE as PREDICTIONS
from ad.predictions import write_test_predictions
from ad.scoring import TestOutputs, evaluate, progress, score, set_thresholds, threshold_results
from ad.summary import METRIC_KEYS
from ad.sweep import run_name as sweep_run_name
from ad.sweep import sweep_tags
from ad.tracking import BackgroundTracker, StoreError, check_tracking, logged_model_name, store_folder
from ad.trainer import Trainer
from ad.validate import check_config, check_dataset
from ad.visualize import overlay_panel, pick_examples

log = logging.getLogger(__name__)

#: Results a sweeper may optimise (``optimized_metric``).
RESULT_KEYS = (*METRIC_KEYS, "fit_s", "test_s", "total_s")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python, NumPy and torch seeded for the block, so a run repeats exactly; their states restored after it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def resolve_device(name: str) -> torch.device:
    """``auto`` means the GPU when there is one; asking for a missing GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ADError(f"trainer.device: '{name}' is not one of auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ADError("trainer.device: cuda was requested but no CUDA GPU is available; use trainer.device=auto")
    return torch.device(name)


def make_loader(dataset: torch.utils.data.Dataset, trainer: DictConfig, device: torch.device) -> DataLoader:
    """Ordered loader (no shuffling: frozen-feature methods don't need it and runs stay repeatable)."""
    workers = int(trainer.num_workers)
    return DataLoader(
        dataset, batch_size=int(trainer.batch_size), shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False, collate_fn=collate,
    )


def open_cache(runtime: DictConfig | None) -> DiskCache | None:
    """The on-disk cache of decoded images and backbone features (``runtime.feature_cache``, off without a
    runtime group), read only where unwritable."""
    if not runtime or not runtime.get("feature_cache", False):
        return None
    max_gb = float(runtime.cache_max_gb)
    if max_gb <= 0:
        raise ADError(f"runtime.cache_max_gb: {max_gb} must be positive; runtime.feature_cache=false turns it off")
    cache = DiskCache(runtime.get("cache_dir"), max_gb=max_gb)
    cache.check_writable()  # a full or read-only folder: one warning, and the run goes on without storing
    return cache


def make_trainer(cfg: DictConfig, run_dir: Path, device: torch.device, dtype: torch.dtype | None, tracker,
                 resume_from: Path | None) -> Trainer:
    """The trainer of gradient-trained methods, from the ``trainer`` config group."""
    settings = cfg.trainer
    return Trainer(
        run_dir, device, dtype, tracker, max_epochs=settings.get("max_epochs"), batch_size=int(settings.batch_size),
        num_workers=int(settings.num_workers), seed=int(cfg.seed), eval_every=settings.get("eval_every"),
        monitor=settings.get("monitor"), checkpoint_every=settings.get("checkpoint_every", 1),
        resume_from=resume_from,
    )


def is_multirun() -> bool:
    """True inside a Hydra sweep job (whose sibling folders are other jobs, never earlier runs of this one)."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_json(path: Path, data: dict) -> None:
    """Write atomically (temp file + rename): a reader never sees a half-written file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def where_to_look(run_dir: Path, links: dict[str, str]) -> dict[str, str]:
    """Where the run's results are: its folder, and its MLflow run with the link that opens it."""
    found = {"run_dir": str(run_dir)}
    if links:
        found.update(mlflow_run_id=links["run_id"], mlflow_url=links["experiment_url"],
                     mlflow_open=links["open_command"])
    return found


def log_examples(tracker, dataset, outputs: TestOutputs, count: int, cache: DiskCache | None) -> None:
    """Overlay panels (image | heat map with ground-truth outline) for a sample of test images."""
    if outputs.maps is None or count <= 0:
        return
    labels, scores = outputs.labels.numpy(), outputs.scores.numpy()
    vmin, vmax = float(outputs.maps.min()), float(outputs.maps.max())
    test_set = dataset.test_set(cache)
    for i in pick_examples(labels, scores, count):
        sample = dataset.test[int(i)]
        image = denormalize(test_set[int(i)]["image"].unsqueeze(0))[0]
        mask = outputs.masks[i].numpy() if dataset.has_masks else None
        title = f"{sample.defect} · score {scores[i]:.3g}"
        panel = overlay_panel(image, outputs.maps[i].numpy(), mask, vmin, vmax, title=title)
        tracker.log_image(panel, f"anomaly_maps/{int(i):03d}_{sample.defect}_{Path(sample.image).stem}.png")


def build(node: DictConfig, key: str, **kwargs):
    """Instantiate a config node; our own errors come out unwrapped, unknown settings name their key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ADError):
            raise cause from None
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            bad = str(cause).rsplit("'", 2)[-2]
            raise ADError(f"{key}.{bad}: unknown setting for {node._target_}; check the spelling") from None
        raise


def choice_names(cfg: DictConfig) -> dict[str, str]:
    """Config-group option names (padim, mvtec...) from Hydra, or from the class names without it."""
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    return {group: cfg[group]._target_.rsplit(".", 1)[-1].lower() for group in ("model", "dataset")}


@contextlib.contextmanager
def before_the_run(cfg: DictConfig, run_dir: Path, run_name: str, tags: dict) -> Iterator[None]:
    """Turn the ADErrors of checks made before the tracker opens a run into ConfigErrors (exit 2: nothing ran).

    A single run then leaves no tracking run; a sweep job is recorded as FAILED (``track_rejection``).
    """
    try:
        yield
    except ADError as exc:
        error = exc if isinstance(exc, ConfigError) else ConfigError(str(exc))
        if is_multirun() and not isinstance(exc, StoreError):  # a store that cannot be used records nothing
            track_rejection(cfg, run_dir, run_name, tags, error)
        if error is exc:
            raise
        raise error from exc


def make_model(cfg: DictConfig, device: torch.device, precision: str,
               cache: DiskCache | None = None) -> AnomalyModel:
    """The method of ``cfg.model`` on ``device``; one that declares ``uses_backbone`` gets the run's ``BackboneSpec``.

    The spec comes from ``cfg.backbone`` with ``precision`` and ``cfg.trainer.channels_last``; with the
    run's feature ``cache`` a backbone built before with the same settings is recalled, not built.
    """
    cls = method_class_of(cfg.model)
    if cls is not None and not getattr(cls, "uses_backbone", True):
        return build(cfg.model, "model", _convert_="all").to(device)
    backbone = BackboneSpec.from_config(cfg.backbone, precision, bool(cfg.trainer.channels_last))
    backbone = dataclasses.replace(backbone, records=cache)
    return build(cfg.model, "model", backbone=backbone, _convert_="object").to(device)


def method_class_of(node: DictConfig) -> type | None:
    """The class a ``model`` node's ``_target_`` names, or None when it does not resolve (``build`` then says why)."""
    from hydra.utils import get_class

    try:
        return get_class(node._target_)
    except Exception:  # noqa: BLE001 - a bad target is reported by build(), with its own message
        return None


def resumable_model(cfg: DictConfig, resume_from: Path, model_name: str, device: torch.device,
                    precision: str) -> AnomalyModel:
    """The model built early and checked against the checkpoint it resumes, before that checkpoint's run reopens."""
    model = make_model(cfg, device, precision)
    if not isinstance(model, TrainableModel):
        raise ADError(f"trainer.resume: {model_name} is fitted in one pass, not trained in epochs; drop it")
    check_checkpoint(resume_from, model, load_checkpoint(resume_from))
    return model


def track_rejection(cfg: DictConfig, run_dir: Path, run_name: str, tags: dict, error: ConfigError) -> None:
    """In a sweep, record a job rejected before it started as a new FAILED run, so the sweep's runs list every job.

    The benchmark table (``ad.report``) reads them; an earlier run a rejected resume names stays untouched.
    """
    try:
        tracker = BackgroundTracker(build(cfg.tracking, "tracking"))
        tracker.start(cfg, run_dir, run_name=run_name, tags=tags)
        tracker.end("FAILED", error=one_line(error))
    except Exception as exc:  # noqa: BLE001 - the job's own error is what the sweep reports
        log.warning("Could not record the rejected job in the tracking store: %s", exc)


def failure(exc: BaseException) -> str:
    """One line for a failed run's ``error`` tag (a DataLoader worker's traceback reduced to its error)."""
    text = one_line(exc)[:2000]
    return text if isinstance(exc, ADError) else f"{type(exc).__name__}: {text}"


def run(cfg: DictConfig, run_dir: Path, started: float | None = None) -> dict:
    """Fit and evaluate one model on one dataset; return the results also written to metrics.json.

    Prints nothing and changes nothing process-wide (the command line tunes its own process,
    ``ad.runtime``). ``started``: the ``time.perf_counter()`` the whole command began at, so that
    total_s counts its start-up; by default total_s counts from this call.
    """
    with seeded(int(cfg.seed)):
        return fit_and_evaluate(cfg, run_dir, started)


def fit_and_evaluate(cfg: DictConfig, run_dir: Path, started: float | None) -> dict:
    """``run``'s work, inside its seeded random state."""
    started = time.perf_counter() if started is None else started
    run_dir.mkdir(parents=True, exist_ok=True)
    choices = choice_names(cfg)
    model_name, dataset_name = choices["model"], choices["dataset"]
    category = str(cfg.dataset.get("category", dataset_name))
    run_name = sweep_run_name(f"{model_name}-{dataset_name}-{category}")  # with the settings a sweep varies
    tags = {"ad.model": model_name, "ad.backbone": cfg.backbone.name, "ad.dataset": dataset_name,
            "ad.category": category, **sweep_tags()}
    model = None
    with before_the_run(cfg, run_dir, run_name, tags):  # bad input stops here: no run is opened or reopened
        check_config(cfg, model_name)
        check_tracking(cfg.get("tracking"))  # an unusable store is found now, not after fit and test
        device = resolve_device(cfg.trainer.device)
        dtype = resolve_precision(cfg.trainer.precision, device)
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        dataset = build(cfg.dataset, "dataset")
        check_dataset(dataset, cfg.get("threshold"))
        tracker = BackgroundTracker(build(cfg.tracking, "tracking"))  # tracking overlaps the work
        resume = cfg.trainer.get("resume")
        if resume in (None, False) and (own := requeued_checkpoint(run_dir)) is not None:
            log.info("Requeued SLURM job: continuing from %s", own)
            resume = str(own)
        resume_from = find_checkpoint(resume, run_dir, model_name, search_siblings=not is_multirun())
        if resume_from is not None:
            model = resumable_model(cfg, resume_from, model_name, device, precision)
    tracker.start(cfg, run_dir, run_name=run_name, tags=tags,
                  resume_run_id=checkpoint_run_id(resume_from) if resume_from else None,
                  start_time=time.time() - (time.perf_counter() - started))  # Duration = the whole command
    try:
        cache = open_cache(cfg.get("runtime"))
        if model is None:
            model = make_model(cfg, device, precision, cache)
        model.use_cache(cache)
        log.info("%s on %s/%s: %d train, %d test images, %s, %s", model_name, dataset_name, category,
                 len(dataset.train), len(dataset.test), device, precision)

        start = time.perf_counter()
        keep_maps = model.produces_maps and dataset.has_masks
        test_loader = make_loader(dataset.test_set(cache), cfg.trainer, device)
        trained = {}
        if isinstance(model, TrainableModel):
            trainer = make_trainer(cfg, run_dir, device, dtype, tracker, resume_from)
            trainer.fit(model, dataset.train_set(cache), lambda: evaluate(model, test_loader, device, keep_maps))
            trained = {"epochs": trainer.epochs}
        else:
            model.fit(progress(make_loader(dataset.train_set(cache), cfg.trainer, device), "fit"), device)
        fit_s = time.perf_counter() - start

        start = time.perf_counter()
        val_loader = make_loader(dataset.val_set(cache), cfg.trainer, device) if dataset.val else None
        image_threshold, pixel_threshold = set_thresholds(cfg.threshold, model, val_loader, device)
        calibrate_s = time.perf_counter() - start

        start = time.perf_counter()
        outputs = score(model, test_loader, device, keep_maps)
        metrics = compute_metrics(outputs.scores, outputs.labels, outputs.maps, outputs.masks)
        metrics.update(operating_point_metrics(
            outputs.scores, outputs.labels, None if image_threshold is None else image_threshold.value,
            outputs.maps, outputs.masks, None if pixel_threshold is None else pixel_threshold.value))
        test_s = time.perf_counter() - start

        uses_backbone = model.uses_backbone  # GANomaly learns from pixels: no backbone to name
        backbone_name = cfg.backbone.name if uses_backbone else "none"
        results = {
            **metrics, **threshold_results(image_threshold, pixel_threshold), "fit_s": round(fit_s, 3),
            "calibrate_s": round(calibrate_s, 3), "test_s": round(test_s, 3), "weights": model.weights_source,
            "model": model_name, "backbone": backbone_name,
            "weights_tag": cfg.backbone.get("tag") if uses_backbone else None,
            "dataset": dataset_name, "category": dataset.category, "image_size": dataset.image_size,
            "n_train": len(dataset.train), "n_val": len(dataset.val), "n_test": len(dataset.test),
            "device": str(device),
            "precision": precision, "seed": int(cfg.seed), "ad_version": ad.__version__, **trained,
        }
        tracker.set_tags({"ad.weights": model.weights_source, "ad.backbone": backbone_name,
                          "ad.category": dataset.category})  # as the dataset names it (BTAD 1 -> 01)
        tracker.log_resolved({"weights": model.weights_source, "backbone": backbone_name, "precision": precision,
                              "device": str(device), "image_size": dataset.image_size, "n_train": len(dataset.train),
                              "n_val": len(dataset.val), "n_test": len(dataset.test), **model.resolved_settings()})
        tracker.log_metrics({k: float(v) for k, v in results.items()
                             if k in metrics or k.endswith(("_s", "_threshold", "_bound"))})
        write_test_predictions(run_dir / PREDICTIONS, dataset.test, outputs.scores.numpy(),
                               None if image_threshold is None else image_threshold.value)
        save_bundle(run_dir / "model", model, run_meta(
            cfg, model, model_name, dataset, precision, (image_threshold, pixel_threshold), results))
        tracker.log_model(run_dir / "model", name=logged_model_name(model_name, backbone_name, dataset.category))
        tracker.log_artifact(run_dir / PREDICTIONS)
        tracker.log_curves(run_dir / PREDICTIONS, None if image_threshold is None else image_threshold.value)
        log_examples(tracker, dataset, outputs, getattr(tracker, "num_images", 0), cache)
        tracker.wait()
        if cache is not None:
            cache.evict()
        # the whole command (start-up, data, tracking and cache writes included), beside fit_s and test_s
        results["total_s"] = round(time.perf_counter() - started, 3)
        results.update(where_to_look(run_dir, tracker.links()))
        write_json(run_dir / "metrics.json", results)
        tracker.log_metrics({"total_s": results["total_s"]})
        tracker.log_artifact(run_dir / "metrics.json")
        tracker.wait()  # a failure to record the results fails the run here, not only its MLflow status
    except KeyboardInterrupt as exc:  # Ctrl-C, or a stop signal (ad.signals.Stopped)
        tracker.end("KILLED", error=str(exc) or "interrupted (Ctrl-C)")
        raise
    except BaseException as exc:
        if not isinstance(exc, ADError) and (where := out_of_space(exc, store_folder(cfg.get("tracking")))):
            full = ADError(f"no space left on {where}; free some space there, or write elsewhere")
            tracker.end("FAILED", error=failure(full))
            raise full from exc
        tracker.end("FAILED", error=failure(exc))
        raise
    tracker.end("FINISHED")
    return results
