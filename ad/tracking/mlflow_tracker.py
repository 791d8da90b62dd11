"""The MLflow tracker: one job's params, metrics, images, config and model in one MLflow run.

Runs are created and ended through ``MlflowClient`` bound to the tracker's store, never through
MLflow's process-wide active run, so a caller's own run (a sweep's parent) is left as it was and a
failure to end a run leaves no state behind to repair.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ad import __version__
from ad.errors import ADError, one_line
from ad.tracking.base import RUN_STATUSES, Tracker, config_container, config_params, logged_model_name, truncate
from ad.tracking.store import DiskReserve, check_uri, resolve_tracking_uri, sqlite_path
from ad.tracking.ui import experiment_tags, experiment_url, open_command, run_url

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

ERROR_TAG_LENGTH = 5000  # MLflow allows 8000; the head of a message is what people read
LOCK_TIMEOUT_S = 600.0
#: Packages pinned in a logged model's requirements when installed (torch and cloudpickle come from MLflow).
#: Metrics shown as columns of the experiment's shared runs-table view.
DEFAULT_COLUMNS = ("image_AUROC", "image_F1", "pixel_AUROC", "pixel_AUPRO", "total_s")
#: System tags MLflow's fluent API would set, which the runs table shows (user, source).
PARENT_RUN_TAG = "mlflow.parentRunId"


def quiet_mlflow_logs() -> None:
    """Lower MLflow's and Alembic's INFO chatter (migrations, run URLs) to warnings only.

    The SQLite store's own traceback of a failed statement is dropped too: the error it re-raises
    reaches the run, which reports it in one line.
    """
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def wants_model(log_model: bool | str) -> bool:
    """Resolve ``tracking.log_model``: true, false, or auto (a single run logs its model, a sweep job does not)."""
    if isinstance(log_model, bool):
        return log_model
    value = str(log_model).strip().lower()
    if value in ("true", "false"):
        return value == "true"
    if value != "auto":
        raise ADError(f"tracking.log_model: '{log_model}' is not one of true, false, auto; set tracking.log_model=auto")
    from ad.sweep import in_multirun

    return not in_multirun()


def chunks(items: list, size: int) -> list[list]:
    """Split ``items`` into consecutive lists of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class MLflowTracker(Tracker):
    """Tracker writing params, metrics, images, config and model of one job to an MLflow run.

    Args:
        uri: tracking URI; None uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``.
        experiment: MLflow experiment name, created on first use.
        log_model: whether :meth:`log_model` stores the model: true, false, or auto (not in sweeps).
        num_images: how many anomaly-map panels the orchestrator should log.
        columns: metrics shown as columns of the experiment's runs-table view (:mod:`ad.tracking.ui`).
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "ad",
        log_model: bool | str = "auto",
        num_images: int = 8,
        columns: Sequence[str] = DEFAULT_COLUMNS,
    ) -> None:
        if uri is not None:
            check_uri(str(uri).strip())
        if not experiment:
            raise ADError("tracking.experiment is empty: give the MLflow experiment a name")
        self.uri = uri
        self.experiment = str(experiment)
        self.save_model = wants_model(log_model)  # not `self.log_model`: that would hide the method
        self.num_images = int(num_images)
        self.columns = tuple(str(name) for name in columns)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None  # set when the caller's active run lives on another thread
        self.resumed = False  # whether start() reopened a run that a resumed training began
        self.model_name = "model"  # set from the run's tags at start()
        self._last_run_id: str | None = None  # kept after end() for links()
        self._uri: str | None = None  # resolved at start()
        self._reserve = DiskReserve()

    # -- run lifecycle -------------------------------------------------------------------------

    def start(
        self, cfg: DictConfig, run_dir: Path, run_name: str, tags: dict[str, str], resume_run_id: str | None = None,
        start_time: float | None = None,
    ) -> None:
        """Open an MLflow run and log the config (params, YAML) and Hydra's ``.hydra`` folder.

        The run starts at ``start_time`` (default: now), so its duration is the job's. With
        ``resume_run_id`` (a training resumed from its checkpoint) that run is reopened instead, so
        its per-epoch metrics continue; its params are left as first logged (MLflow forbids changing
        them), the config YAML and ``.hydra`` artifacts are replaced by the resumed job's.
        """
        import mlflow

        quiet_mlflow_logs()
        if self.run_id is not None:
            self.end("FAILED", error="a new run was started before this one ended")
        self._uri = resolve_tracking_uri(self.uri)
        self.experiment_id = self._experiment_id()
        db = sqlite_path(self._uri)
        if db is not None:
            self._reserve.take(db, self)
        run_tags = {**{str(k): str(v) for k, v in (tags or {}).items()}, "ad.version": __version__}
        run_tags.setdefault("ad.run_dir", str(Path(run_dir).resolve()))
        self.model_name = logged_model_name(run_tags.get("ad.model", ""), run_tags.get("ad.backbone", ""),
                                            run_tags.get("ad.category", ""))
        active = mlflow.active_run()  # e.g. a sweep's parent run, on this thread
        parent = self.parent_run_id or (active.info.run_id if active is not None else None)
        resume = resume_run_id if resume_run_id and self._resumable(resume_run_id) else None
        self.resumed = resume is not None
        client = self._client()
        if resume is not None:
            client.update_run(resume, status="RUNNING")
            self.run_id = resume
        else:
            from mlflow.tracking.context.registry import resolve_tags  # user, source, git commit

            if parent is not None:
                run_tags[PARENT_RUN_TAG] = parent
            started = int(1000 * (time.time() if start_time is None else start_time))
            run = client.create_run(self.experiment_id, start_time=started, tags=resolve_tags(run_tags),
                                    run_name=run_name)
            self.run_id = run.info.run_id
        self._last_run_id = self.run_id
        try:
            if resume is not None:
                self.set_tags({**run_tags, "ad.resumed": "true"})
            self._log_config(cfg, params=resume is None)
            hydra_dir = Path(run_dir) / ".hydra"
            if hydra_dir.is_dir():
                client.log_artifacts(self.run_id, str(hydra_dir), "hydra")
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.end(status, error=f"tracker start failed: {type(exc).__name__}: {exc}")
            raise

    def links(self) -> dict[str, str]:
        """The last run's id, its page, the experiment's runs view with the metric columns, and how to serve the UI."""
        if self._last_run_id is None or self.experiment_id is None:
            return {}
        return {"run_id": self._last_run_id, "run_url": run_url(self._uri, self.experiment_id, self._last_run_id),
                "experiment_url": experiment_url(self._uri, self.experiment_id),
                "open_command": open_command(self._uri)}

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED) and an ``error`` tag.

        Where that fails (a full disk), the space reserved at start is freed and it is tried again,
        so that the run is not left RUNNING.
        """
        run_id, self.run_id = self.run_id, None
        if run_id is None:
            self._reserve.release()
            return
        if status not in RUN_STATUSES:
            log.warning("Unknown run status %r: ending the MLflow run as FAILED", status)
            status = "FAILED"
        try:
            self._end(run_id, status, error)
        except Exception as exc:  # end() runs on failure paths: report, never raise
            failure: Exception = exc
            if self._reserve.release():  # a full disk: the reserve makes room to write the end
                try:
                    self._end(run_id, status, error)
                    return
                except Exception as again:  # noqa: BLE001
                    failure = again
            log.warning("Could not end MLflow run %s as %s: %s", run_id, status, one_line(failure)[:500])
            try:  # without the error tag, in case writing that is what failed
                self._client().set_terminated(run_id, status)
            except Exception as last:  # noqa: BLE001
                log.warning("MLflow run %s may be left RUNNING: %s", run_id, one_line(last)[:500])
        finally:
            self._reserve.release()

    def _end(self, run_id: str, status: str, error: str | None) -> None:
        client = self._client()
        if error:
            client.set_tag(run_id, "error", truncate(str(error), ERROR_TAG_LENGTH))
        elif status == "FINISHED" and self.resumed and "error" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "error")  # why an earlier attempt stopped no longer describes the run
        client.set_terminated(run_id, status)

    # -- logging -------------------------------------------------------------------------------

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags; values are stringified and cut to MLflow's length limit."""
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        run_id = self._require_run()
        batch = [RunTag(str(k), truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in chunks(batch, max_batch()):
            self._client().log_batch(run_id, tags=chunk)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches, values cut to MLflow's limit; on a reopened run, only keys it has not got."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

        run_id = self._require_run()
        client = self._client()
        if self.resumed:
            logged = client.get_run(run_id).data.params
            params = {key: value for key, value in params.items() if str(key) not in logged}
        batch = []
        for key, value in params.items():
            if len(str(key)) > MAX_ENTITY_KEY_LENGTH:
                log.warning("Key too long for an MLflow param, not logged: %s", key)
                continue
            batch.append(Param(str(key), truncate(str(value), MAX_PARAM_VAL_LENGTH)))
        for chunk in chunks(batch, max_batch()):
            client.log_batch(run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics in one batch."""
        from mlflow.entities import Metric

        run_id = self._require_run()
        now = int(time.time() * 1000)
        batch = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
        for chunk in chunks(batch, max_batch()):
            self._client().log_batch(run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path``."""
        run_id = self._require_run()
        path = Path(path)
        if path.is_dir():
            self._client().log_artifacts(run_id, str(path), artifact_path)
        else:
            self._client().log_artifact(run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, name: str) -> None:
        """Upload a uint8 HxWx3 image as ``name`` (a path inside the run's artifacts)."""
        run_id = self._require_run()
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"log_image expects uint8 HxWx3, got {image.dtype} {image.shape}")
        self._client().log_image(run_id, image, artifact_file=name)

    def log_curves(self, predictions: Path, threshold: float | None) -> None:
        from ad.report.artifacts import read_predictions
        from ad.report.plots import run_figure

        found = read_predictions(Path(predictions))
        if found is None:
            return
        uri = run_figure(found, threshold)  # the figure the HTML report draws for the run
        svg = base64.b64decode(uri.split(",", 1)[1]).decode()
        self._client().log_text(self._require_run(), svg, "curves/image_curves.svg")

    def prepare(self) -> None:
        """Run MLflow's check of the model's requirements against this environment on the background thread
        while the job works, ahead of :meth:`log_model`: the check maps every installed distribution to its
        modules once per process, and :meth:`log_model` then finds that map made."""
        if not self.save_model:
            return
        try:
            from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

            from ad.serving import requirements

            warn_dependency_requirement_mismatches(requirements())
        except Exception as exc:  # only a warm-up: log_model works without it
            log.debug("MLflow requirement check ahead of log_model skipped: %s", exc)

    def log_model(self, bundle: Path, name: str | None = None) -> None:
        """Log the run's model bundle as its MLflow model (a pyfunc from code: nothing pickled, see ``ad.serving``)."""
        if not self.save_model:
            return
        from ad.serving import log_bundle

        log_bundle(Path(bundle), name or self.model_name, self._require_run(), uri=self._uri)

    # -- helpers -------------------------------------------------------------------------------

    def _client(self):
        """Return a client bound to this tracker's store (not to MLflow's global URI)."""
        from mlflow import MlflowClient

        return MlflowClient(self._uri)

    def _resumable(self, run_id: str) -> bool:
        """Whether ``run_id`` exists in this store and is not deleted; otherwise warn (a new run starts)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client().get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s of the checkpoint is not in %s: logging to a new run", run_id, self._uri)
            return False
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s of the checkpoint is deleted: logging to a new run", run_id)
            return False
        return True

    def _require_run(self) -> str:
        """Return the active run id, or raise if :meth:`start` was not called."""
        if self.run_id is None:
            raise RuntimeError("MLflowTracker: call start() before logging")
        return self.run_id

    def _experiment_id(self) -> str:
        """Find or create the experiment; for SQLite under a file lock, with artifacts beside the DB."""
        db = sqlite_path(self._uri)
        if db is None:
            return self._get_or_create_experiment(artifact_location=None)
        from filelock import FileLock, Timeout

        db.parent.mkdir(parents=True, exist_ok=True)
        try:  # the first process to touch a new DB migrates it; others must wait for that
            with FileLock(f"{db}.lock", timeout=LOCK_TIMEOUT_S):
                return self._get_or_create_experiment((db.parent / "mlartifacts").as_uri())
        except Timeout:
            raise ADError(
                f"tracking.uri={self._uri!r}: waited {LOCK_TIMEOUT_S:.0f} s for {db}.lock; "
                "remove it if no other ad job is running"
            ) from None

    def _get_or_create_experiment(self, artifact_location: str | None) -> str:
        """Return the id of ``self.experiment``, creating it (tolerating a concurrent creator) with its UI tags."""
        from mlflow.exceptions import MlflowException

        client = self._client()
        tags = experiment_tags(self.columns)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment, artifact_location=artifact_location, tags=tags)
            except MlflowException:  # created meanwhile by another job
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise ADError(
                f"tracking.experiment={self.experiment!r} is deleted in {self._uri}: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or choose another name"
            )
        for key, value in tags.items():  # an experiment made before, or by something else
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def _log_config(self, cfg: DictConfig, params: bool = True) -> None:
        """Log the resolved config as YAML and (unless ``params`` is false) as dotted params and ``choice.*``."""
        from omegaconf import OmegaConf

        if params:
            self.log_params(config_params(cfg))
        self._client().log_text(self.run_id, OmegaConf.to_yaml(config_container(cfg)), "config/config.yaml")


def max_batch() -> int:
    """Return MLflow's limit on params/metrics per batch call."""
    from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

    return MAX_PARAMS_TAGS_PER_BATCH
