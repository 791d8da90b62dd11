"""Experiment tracking: a no-op tracker and an MLflow tracker behind one small interface.

The run orchestrator only talks to :class:`Tracker`; ``conf/tracking/*.yaml`` picks the class.
MLflow is imported lazily so that ``tracking=none`` works without it.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ad import __version__
from ad.errors import ADError, ConfigError, one_line

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

__all__ = [
    "BackgroundTracker",
    "MLflowTracker",
    "NullTracker",
    "StoreError",
    "Tracker",
    "check_store",
    "check_tracking",
    "flatten_config",
    "resolve_tracking_uri",
]

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRUNCATION_MARKER = "...[truncated]"
ERROR_TAG_LENGTH = 5000  # MLflow allows 8000; the head of a message is what people read
LOCK_TIMEOUT_S = 600.0
# Packages pinned in a logged model's requirements when installed (torch and cloudpickle come
# from MLflow); an explicit list skips MLflow's slow requirement inference.
MODEL_REQUIREMENTS = ("numpy", "timm", "faiss-cpu", "faiss-gpu")
#: How long the start-up probe of a tracking server waits for it to answer.
PROBE_TIMEOUT_S = 5.0
#: Less free space than this on the SQLite store's disk counts as full.
MIN_FREE_BYTES = 1 << 20
#: Space kept beside a SQLite store while a run is open, freed to end the run when the disk fills.
RESERVE_BYTES = 1 << 20
SQLITE_HEADER = b"SQLite format 3\x00"
#: Default ports of the database servers MLflow stores runs in (probed with a TCP connect).
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class StoreError(ConfigError):
    """The tracking store cannot be used, found before any work: exit 2, and no job can be recorded in it."""


class Tracker:
    """No-op tracker: the interface the run orchestrator calls, and the behaviour of ``tracking=none``."""

    run_id: str | None = None
    num_images: int = 0  # how many anomaly-map panels the orchestrator should render and log
    save_model: bool = False  # whether log_model stores anything

    def start(
        self, cfg: DictConfig, run_dir: Path, run_name: str, tags: dict[str, str], resume_run_id: str | None = None
    ) -> None:
        """Open a run for one job (or reopen ``resume_run_id``, a run a resumed training began)."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Attach string tags to the run (e.g. ``ad.weights``)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record scalar results."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Store a file (or a folder) with the run."""

    def log_image(self, image: np.ndarray, name: str) -> None:
        """Store a uint8 HxWx3 image under ``name`` (e.g. ``anomaly_maps/000_good.png``)."""

    def log_model(self, model: torch.nn.Module, name: str = "model") -> None:
        """Store the fitted model."""

    def prepare(self) -> None:
        """Warm up what later logging needs (called on a background thread while the job runs)."""

    def wait(self) -> None:
        """Block until everything logged so far is stored (trackers that log in the background)."""

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run; never raises and may be called repeatedly."""


class NullTracker(Tracker):
    """Tracker that records nothing (``tracking=none``); needs no MLflow."""


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


def resolve_tracking_uri(uri: str | None) -> str:
    """Return the URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative SQLite paths are made absolute so the store does not move with the working directory.
    """
    import os

    key = "tracking.uri"
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        key = "MLFLOW_TRACKING_URI"
    if uri is None:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    uri = str(uri).strip()
    check_uri(uri, key)
    db = sqlite_path(uri)
    if db is not None:
        return f"sqlite:///{db}"
    return uri


def check_uri(uri: str, key: str = "tracking.uri") -> None:
    """Reject plain paths and ``file:`` stores, which MLflow 3 no longer accepts as tracking stores."""
    if uri.startswith("databricks") or uri == "uc":
        return
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if len(scheme) <= 1 or scheme == "file":  # no scheme, or a Windows drive letter
        raise ADError(
            f"{key}={uri!r} is a folder, which MLflow 3 no longer accepts as a tracking store: "
            f"use {key}=sqlite:///path/to/mlflow.db (a local file) or http://host:port (a server)"
        )


def sqlite_path(uri: str) -> Path | None:
    """Return the absolute database file of a ``sqlite:///`` URI, or None for other URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw).expanduser().resolve()


def check_tracking(node: DictConfig | None) -> None:
    """Probe the store of a ``tracking`` config node (MLflow only) before any work, see ``check_store``."""
    if node is not None and str(node.get("_target_", "")).endswith(".MLflowTracker"):
        check_store(node.get("uri"))


def check_store(uri: str | None) -> None:
    """Raise StoreError naming the URI and what to do when the tracking store cannot be used.

    Found at start-up in a second or so, not after fit and test as MLflow's retries would find it:
    a server must answer within ``PROBE_TIMEOUT_S``; a SQLite file must be a database (or absent),
    readable and writable, in a writable folder with space left. Other stores are not probed.
    """
    import os
    from urllib.parse import urlsplit

    key = "tracking.uri" if uri is not None or not os.environ.get("MLFLOW_TRACKING_URI") else "MLFLOW_TRACKING_URI"
    resolved = resolve_tracking_uri(uri)
    db = sqlite_path(resolved)
    parts = urlsplit(resolved)
    scheme = parts.scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if db is not None:
        problem = sqlite_problem(db, key)
    elif scheme in ("http", "https"):
        problem = server_problem(resolved, key)
    elif scheme in DATABASE_PORTS and parts.hostname:
        problem = connect_problem(parts.hostname, parts.port or DATABASE_PORTS[scheme], key)
    else:
        problem = None
    if problem:
        raise StoreError(f"{key}={resolved!r}: {problem}")


def _reason(exc: BaseException) -> str:
    """The short cause of a failed probe (``Connection refused``, ``timed out``...)."""
    import urllib.error

    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else Exception(str(exc.reason))
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def server_problem(uri: str, key: str) -> str | None:
    """What stops an MLflow server at ``uri`` from being used: no answer to GET /health in time, or a gateway error."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    where = urlsplit(uri).netloc
    todo = f"start the MLflow server (mlflow server), point {key} at one that runs, or set tracking=none"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as exc:  # it answers; a proxy in front of a stopped server says 502-504
        if exc.code in (502, 503, 504):
            return f"the server at {where} answers {exc.code} {exc.reason}; {todo}"
        return None
    except (OSError, ValueError) as exc:  # URLError, a timeout, a reset connection
        return f"no server answers at {where} ({_reason(exc)}); {todo}"


def connect_problem(host: str, port: int, key: str) -> str | None:
    """Whether a database server accepts a TCP connection within ``PROBE_TIMEOUT_S``."""
    import socket

    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"no database server answers at {host}:{port} ({_reason(exc)}); start it or point {key} at one that runs"
    return None


def sqlite_problem(db: Path, key: str) -> str | None:
    """What stops MLflow from using the SQLite file ``db``: not a database, read-only, an unwritable or full folder.

    The file is opened for writing (not written) and a temporary file is made in its folder, so a
    read-only file system is found even where permissions are not enforced (root).
    """
    import os
    import tempfile

    other = f"point {key} at another file (sqlite:///path/to/mlflow.db)"
    folder = db.parent
    while not folder.exists() and folder != folder.parent:  # MLflow creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder, so {db} cannot be created; {other}"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"the folder {folder} is not writable ({_reason(exc)}); make it writable or {other}"
    try:
        stat = os.statvfs(folder)
        if stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES:
            return f"no space left on {folder}; free some space or {other}"
    except OSError:  # no statvfs here: MLflow will tell
        pass
    if not db.exists():
        return None
    if db.is_dir():
        return f"{db} is a folder, not an SQLite database; {other}"
    try:
        with open(db, "r+b") as file:
            header = file.read(len(SQLITE_HEADER))
        if not os.access(db, os.R_OK | os.W_OK):
            raise PermissionError("permission denied")
    except OSError as exc:
        return f"{db} is not readable and writable ({_reason(exc)}); make it so (chmod u+rw) or {other}"
    if header and header != SQLITE_HEADER:
        return f"{db} is not an SQLite database; move it away or {other}"
    return None


def store_folder(node: DictConfig | None) -> Path | None:
    """The folder of the SQLite store of a ``tracking`` config node; None for other stores and trackers."""
    if node is None or not str(node.get("_target_", "")).endswith(".MLflowTracker"):
        return None
    db = sqlite_path(resolve_tracking_uri(node.get("uri")))
    return db.parent if db is not None else None


def quiet_mlflow_logs() -> None:
    """Lower MLflow's and Alembic's INFO chatter (migrations, run URLs) to warnings only.

    The SQLite store's own traceback of a failed statement is dropped too: the error it re-raises
    reaches the run, which reports it in one line.
    """
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def pinned_requirements() -> list[str]:
    """Return explicit pip requirements for a logged model, so MLflow skips its slow inference."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow.pytorch

    reqs = list(mlflow.pytorch.get_default_pip_requirements())
    for package in MODEL_REQUIREMENTS:
        try:
            reqs.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


class MLflowTracker(Tracker):
    """Tracker writing params, metrics, images, config and model of one job to an MLflow run.

    Args:
        uri: tracking URI; None uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``.
        experiment: MLflow experiment name, created on first use.
        log_model: whether :meth:`log_model` stores the model (large for memory-bank methods).
        num_images: how many anomaly-map panels the orchestrator should log.
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "ad",
        log_model: bool = True,
        num_images: int = 8,
    ) -> None:
        if uri is not None:
            check_uri(str(uri).strip())
        if not experiment:
            raise ADError("tracking.experiment is empty: give the MLflow experiment a name")
        self.uri = uri
        self.experiment = str(experiment)
        self.save_model = bool(log_model)  # not `self.log_model`: that would hide the method
        self.num_images = int(num_images)
        self.run_id: str | None = None
        self.parent_run_id: str | None = None  # set when the caller's active run lives on another thread
        self.resumed = False  # whether start() reopened a run that a resumed training began
        self._uri: str | None = None  # resolved at start()
        self._reserve: Path | None = None  # space kept beside a SQLite store, freed to end the run on a full disk

    # -- run lifecycle -------------------------------------------------------------------------

    def start(
        self, cfg: DictConfig, run_dir: Path, run_name: str, tags: dict[str, str], resume_run_id: str | None = None
    ) -> None:
        """Open an MLflow run and log the config (params, YAML) and Hydra's ``.hydra`` folder.

        With ``resume_run_id`` (a training resumed from its checkpoint) that run is reopened instead,
        so its per-epoch metrics continue; its params are left as first logged (MLflow forbids
        changing them), the config YAML and ``.hydra`` artifacts are replaced by the resumed job's.
        """
        import mlflow

        quiet_mlflow_logs()
        if self.run_id is not None:
            self.end("FAILED", error="a new run was started before this one ended")
        self._uri = resolve_tracking_uri(self.uri)
        experiment_id = self._experiment_id()
        self._reserve_space()
        mlflow.set_tracking_uri(self._uri)
        run_tags = {**{str(k): str(v) for k, v in (tags or {}).items()}, "ad.version": __version__}
        run_tags.setdefault("ad.run_dir", str(Path(run_dir).resolve()))
        active = mlflow.active_run()  # e.g. a sweep's parent run
        parent = self.parent_run_id or (active.info.run_id if active is not None else None)
        resume = resume_run_id if resume_run_id and self._resumable(resume_run_id) else None
        self.resumed = resume is not None
        if resume is not None:
            run_tags["ad.resumed"] = "true"
            run = mlflow.start_run(run_id=resume, tags=run_tags, nested=parent is not None)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=run_name,
                tags=run_tags,
                nested=parent is not None,
                parent_run_id=parent,
            )
        self.run_id = run.info.run_id
        try:
            self._log_config(cfg, params=resume is None)
            hydra_dir = Path(run_dir) / ".hydra"
            if hydra_dir.is_dir():
                self._client().log_artifacts(self.run_id, str(hydra_dir), "hydra")
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.end(status, error=f"tracker start failed: {type(exc).__name__}: {exc}")
            raise

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED) and an ``error`` tag.

        Where that fails (a full disk), the space reserved at start is freed and it is tried again,
        so that the run is not left RUNNING.
        """
        run_id, self.run_id = self.run_id, None
        if run_id is None:
            self._release_reserve()
            return
        if status not in RUN_STATUSES:
            log.warning("Unknown run status %r: ending the MLflow run as FAILED", status)
            status = "FAILED"
        try:
            self._end(run_id, status, error)
        except Exception as exc:  # end() runs on failure paths: report, never raise
            failure: Exception = exc
            if self._release_reserve():  # a full disk: the reserve makes room to write the end
                try:
                    self._end(run_id, status, error)
                    return
                except Exception as again:  # noqa: BLE001
                    failure = again
            log.warning("Could not end MLflow run %s as %s: %s", run_id, status, one_line(failure)[:500])
            self._force_terminate(run_id, status)
        finally:
            self._release_reserve()

    def _end(self, run_id: str, status: str, error: str | None) -> None:
        import mlflow

        client = self._client()
        if error:
            client.set_tag(run_id, "error", truncate(str(error), ERROR_TAG_LENGTH))
        elif status == "FINISHED" and self.resumed and "error" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "error")  # why an earlier attempt stopped no longer describes the run
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            if mlflow.get_tracking_uri() != self._uri:
                mlflow.set_tracking_uri(self._uri)
            mlflow.end_run(status)  # pops the fluent run stack too (before it writes)
        else:
            client.set_terminated(run_id, status)

    def _reserve_space(self) -> None:
        """Keep ``RESERVE_BYTES`` beside a SQLite store while the run is open: on a full disk, SQLite needs
        room to write the run's end, and ``end`` frees this for it. Best effort: no reserve, no error."""
        import os

        db = sqlite_path(self._uri)
        if db is None or self._reserve is not None:
            return
        for stale in db.parent.glob(f".{db.name}.reserve-*"):  # of processes killed outright
            pid = stale.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
        path = db.parent / f".{db.name}.reserve-{os.getpid()}-{id(self):x}"
        try:
            with open(path, "wb") as file:
                file.write(bytes(RESERVE_BYTES))  # written, not sparse: the blocks are really taken
            self._reserve = path
        except OSError:
            path.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        """Delete the reserve file; True when there was one."""
        path, self._reserve = self._reserve, None
        if path is None:
            return False
        try:
            path.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    # -- logging -------------------------------------------------------------------------------

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags; values are stringified and cut to MLflow's length limit."""
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        run_id = self._require_run()
        batch = [RunTag(str(k), truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in chunks(batch, max_batch()):
            self._client().log_batch(run_id, tags=chunk)

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

    def prepare(self) -> None:
        """Import MLflow's model flavour and build its installed-package map ahead of ``log_model``.

        MLflow checks a logged model's requirements against the environment with a map from every
        installed distribution to its modules (seconds to build); the map is built here, on the
        background thread, from the pinned requirements alone. Private MLflow helpers, so failures
        are ignored: ``log_model`` then builds the full map itself.
        """
        if not self.save_model:
            return
        try:
            from mlflow.utils import requirements_utils
            from packaging.requirements import Requirement

            requirements = pinned_requirements()
            if requirements_utils._MODULES_TO_PACKAGES is None:
                # MLflow maps every installed distribution to its modules for that check (about 1 s of
                # importlib's packages_distributions here). The requirements are pinned from this very
                # environment, and the check reads each one's installed version by its distribution
                # name, so a map of just those names gives the same answers.
                names = {Requirement(requirement).name for requirement in requirements}
                requirements_utils._MODULES_TO_PACKAGES = {name: [name] for name in names}
            requirements_utils._init_packages_to_modules_map()
        except Exception as exc:  # only a warm-up: log_model works without it
            log.debug("MLflow requirement warm-up skipped: %s", exc)

    def log_model(self, model: torch.nn.Module, name: str = "model") -> None:
        """Log the model as an MLflow ``pytorch`` model (pickled) if ``log_model`` is enabled.

        Pickle keeps custom classes and non-tensor state; loading it back needs the ``ad``
        package importable and ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``.
        """
        if not self.save_model:
            return
        import mlflow.pytorch

        run_id = self._require_run()
        pytorch_log = logging.getLogger("mlflow.pytorch")
        level = pytorch_log.level
        pytorch_log.setLevel(logging.ERROR)  # drop the per-call "pickle needs caution" warning
        try:
            mlflow.pytorch.log_model(
                model,
                name=name,
                pip_requirements=pinned_requirements(),
                serialization_format="pickle",
                run_id=run_id,
            )
        finally:
            pytorch_log.setLevel(level)

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
        """Return the id of ``self.experiment``, creating it (tolerating a concurrent creator)."""
        from mlflow.exceptions import MlflowException

        client = self._client()
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment, artifact_location=artifact_location)
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
        return experiment.experiment_id

    def _log_config(self, cfg: DictConfig, params: bool = True) -> None:
        """Log the resolved config as YAML and (unless ``params`` is false) as dotted params and ``choice.*``."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
        from omegaconf import OmegaConf

        container = config_container(cfg)
        flat = {}
        if params:
            flat = {**flatten_config(container), **{f"choice.{k}": v for k, v in hydra_choices(cfg).items()}}
        batch = []
        for key, value in flat.items():
            if len(key) > MAX_ENTITY_KEY_LENGTH:
                log.warning("Config key too long for an MLflow param, not logged: %s", key)
                continue
            batch.append(Param(key, truncate(str(value), MAX_PARAM_VAL_LENGTH)))
        client = self._client()
        for chunk in chunks(batch, max_batch()):
            client.log_batch(self.run_id, params=chunk)
        client.log_text(self.run_id, OmegaConf.to_yaml(container), "config/config.yaml")

    def _force_terminate(self, run_id: str, status: str) -> None:
        """Last resort for :meth:`end`: drop the run from MLflow's stack and mark it terminated."""
        try:
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.tracking.fluent._active_run_stack.get().pop()
            self._client().set_terminated(run_id, status)
        except Exception as exc:
            log.warning("MLflow run %s may be left RUNNING: %s", run_id, exc)


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user counts as running)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def max_batch() -> int:
    """Return MLflow's limit on params/metrics per batch call."""
    from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

    return MAX_PARAMS_TAGS_PER_BATCH


def chunks(items: list, size: int) -> list[list]:
    """Split ``items`` into consecutive lists of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class BackgroundTracker(Tracker):
    """Runs another tracker's calls in order on one background thread, so tracking overlaps the work.

    Opening MLflow's store (imports, schema check) and logging a model cost several seconds of
    Python that need not hold up fitting and scoring. The thread runs at the run's own priority:
    the run waits for it at its end, and a thread at lowered priority would then stall the run
    for as long as ordinary load keeps the cores busy (see ``ad.priority``). Calls return at
    once; a failed call is re-raised on the next call or by :meth:`wait`, and :meth:`end` waits
    for everything queued.
    MLflow's fluent run stack is per thread, so every call to the wrapped tracker runs on the
    same single worker thread.
    """

    def __init__(self, inner: Tracker) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.inner = inner
        self.num_images = inner.num_images
        # Not lowered: at the lowest priority a cold PaDiM fit ran faster, but on a busy machine the
        # run then waited on this thread without end; the whole command is faster at equal priority.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracker")
        self._pending: list = []

    @property
    def run_id(self) -> str | None:
        """The wrapped tracker's run id, once its start has gone through."""
        self.wait()
        return self.inner.run_id

    def _submit(self, method: str, *args, **kwargs) -> None:
        self._submit_call(getattr(self.inner, method), *args, **kwargs)

    def _submit_call(self, call, *args, **kwargs) -> None:
        self._raise_failures(block=False)
        self._pending.append(self._pool.submit(call, *args, **kwargs))

    def _raise_failures(self, block: bool) -> None:
        """Re-raise the first failed call (waiting for all of them when ``block``)."""
        if block:
            for future in self._pending:
                future.exception()
        for future in self._pending:
            if future.done() and future.exception() is not None:
                self._pending = []
                raise future.exception()
        self._pending = [future for future in self._pending if not future.done()]

    def wait(self) -> None:
        """Block until every queued call has run; re-raise the first one that failed."""
        self._raise_failures(block=True)

    def start(self, cfg: DictConfig, run_dir: Path, run_name: str, tags: dict[str, str], **kwargs) -> None:
        mlflow = sys.modules.get("mlflow")  # a caller's active run lives on the caller's thread
        active = mlflow.active_run() if mlflow is not None else None
        if active is not None and hasattr(self.inner, "parent_run_id"):
            self.inner.parent_run_id = active.info.run_id
        self._submit("start", cfg, run_dir, run_name, tags, **kwargs)
        self._submit("prepare")

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit("set_tags", dict(tags))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._submit("log_metrics", dict(metrics), step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit("log_artifact", path, artifact_path)

    def log_image(self, image: np.ndarray, name: str) -> None:
        self._submit("log_image", image, name)

    def log_model(self, model: torch.nn.Module, name: str = "model") -> None:
        """Log a copy taken now, moved to the CPU on the worker: the run goes on scoring with the model."""
        if not self.inner.save_model:
            return
        snapshot = copy.deepcopy(model)
        self._submit_call(lambda: self.inner.log_model(snapshot.cpu(), name))

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Finish whatever is queued, then end the run; a queued failure turns FINISHED into FAILED."""
        for future in self._pending:
            failure = future.exception()
            if failure is not None and status == "FINISHED":
                status, error = "FAILED", f"{type(failure).__name__}: {failure}"
        self._pending = []
        self._pool.submit(self.inner.end, status, error).result()
        self._pool.shutdown(wait=True)
