"""The tracker interface the run talks to, its no-op implementation, and how a run's config becomes params."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRUNCATION_MARKER = "...[truncated]"
#: Prefix of the params recording what a run actually used, beside the requested config values.
RESOLVED_PREFIX = "resolved."
#: Characters MLflow refuses in a logged model's name.
MODEL_NAME_FORBIDDEN = re.compile(r"[/:.%\"'\s]+")


class Tracker:
    """No-op tracker: the interface the run orchestrator calls, and the behaviour of ``tracking=none``."""

    run_id: str | None = None
    num_images: int = 0  # how many anomaly-map panels the orchestrator should render and log
    save_model: bool = False  # whether log_model stores anything

    def start(
        self, cfg: DictConfig, run_dir: Path, run_name: str, tags: dict[str, str], resume_run_id: str | None = None,
        start_time: float | None = None,
    ) -> None:
        """Open a run for one job (or reopen ``resume_run_id``, a run a resumed training began).

        ``start_time`` (seconds since the epoch) is when the job began, so that the run's duration
        covers the whole job rather than starting when the store answered.
        """

    def set_tags(self, tags: dict[str, str]) -> None:
        """Attach string tags to the run (e.g. ``ad.weights``)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record settings; a key logged before keeps its first value (MLflow forbids changing it)."""

    def log_resolved(self, values: dict[str, Any]) -> None:
        """Record what the run actually used (``n_features``, weights source, precision, device) as
        ``resolved.*`` params, beside the requested config values that may say ``null`` or ``auto``."""
        self.log_params({f"{RESOLVED_PREFIX}{key}": value for key, value in values.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record scalar results."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Store a file (or a folder) with the run."""

    def log_image(self, image: np.ndarray, name: str) -> None:
        """Store a uint8 HxWx3 image under ``name`` (e.g. ``anomaly_maps/000_good.png``)."""

    def log_curves(self, predictions: Path, threshold: float | None) -> None:
        """Store the image-level ROC and precision-recall curves and the score histogram of a run's
        ``predictions.csv``, with the operating threshold marked (``curves/image_curves.svg``)."""

    def log_model(self, bundle: Path, name: str | None = None) -> None:
        """Store the run's model bundle folder as its model, under ``name`` or else one made of the run's
        method, backbone and category."""

    def prepare(self) -> None:
        """Warm up what later logging needs (called on a background thread while the job runs)."""

    def wait(self) -> None:
        """Block until everything logged so far is stored (trackers that log in the background)."""

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run; never raises and may be called repeatedly."""

    def links(self) -> dict[str, str]:
        """Where the last run can be seen (``run_id``, ``run_url``, ``experiment_url``, ``open_command``); empty
        when nothing is tracked. Valid after :meth:`end` too, for the line a run ends with."""
        return {}


class NullTracker(Tracker):
    """Tracker that records nothing (``tracking=none``); needs no MLflow."""


def logged_model_name(method: str, backbone: str, category: str) -> str:
    """The name a run's model is logged under (``padim-resnet18-brick``), so models tell apart in MLflow's list."""
    parts = [str(part) for part in (method, backbone, category) if part not in (None, "", "none")]
    return MODEL_NAME_FORBIDDEN.sub("_", "-".join(parts)) or "model"


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, ending with a visible marker when cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(TRUNCATION_MARKER))] + TRUNCATION_MARKER


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (``model.n_features``) so params mirror overrides."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_container(cfg: DictConfig) -> dict[str, Any]:
    """Return the config as plain data without the ``hydra`` node, resolved where it resolves."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}
    for key in cfg.keys():
        if key == "hydra":
            continue
        try:
            value = cfg[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception as exc:  # an interpolation that only resolves inside a Hydra job
            log.warning("Logging config key %r unresolved: %s", key, exc)
            out[key] = OmegaConf.to_container(cfg, resolve=False)[key]
    return out


def hydra_choices(cfg: DictConfig) -> dict[str, Any]:
    """Return the chosen config-group options (``{"model": "padim"}``), from cfg or the live Hydra job."""
    choices = None
    try:
        if "hydra" in cfg:
            choices = cfg.hydra.runtime.choices
        else:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                choices = HydraConfig.get().runtime.choices
    except Exception:  # no Hydra, or a partial hydra node
        return {}
    if not choices:
        return {}
    return {k: v for k, v in dict(choices).items() if not str(k).startswith("hydra/")}


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The params a run records for its config: dotted keys of the resolved config, and ``choice.<group>``."""
    return {**flatten_config(config_container(cfg)), **{f"choice.{k}": v for k, v in hydra_choices(cfg).items()}}
