"""Checkpoint files of gradient-trained methods: what they hold, how they are written, found and checked.

A checkpoint holds the trainable weights (frozen backbones are rebuilt from the config and checked by
their hash), optimiser, gradient-scaler and random states, the position in training and the MLflow
run id; it is written atomically, so a kill mid-write never leaves a broken one.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from ad.backbone import FeatureExtractor
from ad.errors import ADError, causes, write_error

CHECKPOINT_FORMAT = 1

# -- random states --------------------------------------------------------------------------------

def rng_states() -> dict:
    """Every random state training may draw from, as tensors and plain values (loadable weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` saved."""
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- checkpoint files -----------------------------------------------------------------------------

def frozen_prefixes(model: torch.nn.Module) -> dict[str, FeatureExtractor]:
    """Frozen backbones by their state-dict prefix: rebuilt from the config, never saved."""
    return {f"{name}.": module for name, module in model.named_modules() if isinstance(module, FeatureExtractor)}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its frozen backbones (those are tens to hundreds of MB)."""
    prefixes = tuple(frozen_prefixes(model))
    return {k: v for k, v in model.state_dict().items() if not (prefixes and k.startswith(prefixes))}


def backbone_settings(model: torch.nn.Module) -> dict[str, dict]:
    """Each frozen backbone's settings, saved beside its identity hash so that a rejected resume can name them."""
    return {prefix: {"name": module.name, "weights": module.weights_source, "tag": module.tag or "null",
                     "layers": ",".join(module.layers), "precision": module.precision,
                     "channels_last": bool(module.channels_last)}
            for prefix, module in frozen_prefixes(model).items()}


def describe_backbone(settings: dict) -> str:
    """A frozen backbone's saved settings in words: ``resnet18 (weights random, tag tv_in1k, layers ..., fp32)``."""
    layout = ", channels_last" if settings["channels_last"] else ""
    return (f"{settings['name']} (weights {settings['weights']}, tag {settings['tag']}, layers {settings['layers']}, "
            f"{settings['precision']}{layout})")


def check_checkpoint(path: Path, model: torch.nn.Module, state: dict) -> None:
    """ADError unless checkpoint ``state`` was written by this model class with these frozen backbones and keys.

    Run before the tracker reopens the checkpoint's MLflow run, so a rejected resume leaves that run as it was;
    the message names the checkpoint's own settings, which are what the command must repeat.
    """
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if state.get("format") != CHECKPOINT_FORMAT or state.get("model_class") != name:
        raise ADError(f"trainer.resume: {path} is a checkpoint of {state.get('model_class')}, not of {name}; "
                      f"resume with model= of that run, or drop trainer.resume")
    saved, current = state.get("backbones", {}), backbone_settings(model)
    for prefix, module in frozen_prefixes(model).items():
        if state["frozen"].get(prefix) != module.identity():
            was = describe_backbone(saved[prefix]) if prefix in saved else "another frozen backbone"
            raise ADError(f"trainer.resume: {path} was trained with backbone {was}, this run has "
                          f"{describe_backbone(current[prefix])}; resume with the checkpoint's backbone settings "
                          f"(backbone.name, backbone.weights, backbone.tag, model.layers, trainer.precision), "
                          f"or drop trainer.resume")
    own = trainable_state(model)
    missing = [key for key in own if key not in state["model"]]
    unexpected = [key for key in state["model"] if key not in own]
    misshapen = [key for key in own if key in state["model"] and state["model"][key].shape != own[key].shape]
    if missing or unexpected or misshapen:
        raise ADError(f"trainer.resume: {path} does not fit this model (missing {missing[:3]}, unexpected "
                      f"{unexpected[:3]}, other shapes {misshapen[:3]}); resume with the run's model settings")


def save_atomic(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a broken checkpoint.

    Saved through an open file, so a full disk is an OSError (torch's own writer says only "file write
    failed"), raised as one line: ``no space left on <folder>``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            torch.save(payload, file)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's writer raises a RuntimeError while the OSError unwinds
        cause = next((e for e in causes(exc) if isinstance(e, OSError)), None)
        if cause is None:
            raise
        raise write_error(cause, path) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def link_atomic(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link; a copy where links are not supported)."""
    import shutil

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as exc:  # a full disk (the copy) or a read-only folder: one line
        raise write_error(exc, target) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint (tensors and plain values only: no code runs on load)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ADError(f"trainer.resume: cannot read checkpoint {path} ({first})") from None


def checkpoint_run_id(path: Path) -> str | None:
    """The MLflow run id stored in a checkpoint, read without loading its tensors (memory-mapped)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run_id")
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ADError(f"trainer.resume: cannot read checkpoint {path} ({str(exc).strip()[:200]})") from None


def find_checkpoint(resume: bool | str | None, run_dir: Path, model_name: str, search_siblings: bool) -> Path | None:
    """The checkpoint ``trainer.resume`` names: none (false), a path, or true = the latest one of this model.

    ``true`` looks in the run folder first (``hydra.run.dir=<old run>`` resumes in place), then, for
    single runs, in the sibling run folders named ``*_<model>`` (the default ``outputs/runs/<time>_<model>``
    layout), taking the most recently written ``checkpoints/last.pt``.
    """
    if resume in (None, False) or (isinstance(resume, str) and resume.lower() in ("", "false", "none", "null")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        own = run_dir / "checkpoints" / "last.pt"
        if own.is_file():
            return own
        candidates = []
        if search_siblings and run_dir.parent.is_dir():
            candidates = [p for p in run_dir.parent.glob(f"*_{model_name}/checkpoints/last.pt")
                          if p.parent.parent.resolve() != run_dir.resolve()]
        if not candidates:
            raise ADError(f"trainer.resume=true: no checkpoints/last.pt of a {model_name} run in {run_dir} "
                          f"or beside it; pass trainer.resume=/path/to/last.pt")
        return max(candidates, key=lambda p: p.stat().st_mtime_ns)
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "checkpoints" / "last.pt", path / "last.pt") if p.is_file()), path)
    if not path.is_file():
        raise ADError(f"trainer.resume: '{resume}' is not a checkpoint file or a run folder holding one")
    return path


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """A requeued SLURM job's own ``checkpoints/last.pt`` (``SLURM_RESTART_COUNT`` > 0), else None.

    A job preempted or out of time saves it on submitit's signal (``ad.signals``) and is requeued
    into the same run folder; continuing from it keeps the epochs done, without ``trainer.resume``.
    """
    own = Path(run_dir) / "checkpoints" / "last.pt"
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return own if restarts.isdigit() and int(restarts) > 0 and own.is_file() else None
