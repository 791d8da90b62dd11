"""Experiment tracking: a no-op tracker and an MLflow tracker behind one small interface.

The run orchestrator only talks to :class:`Tracker` (``base``); ``conf/tracking/*.yaml`` picks the
class: :class:`MLflowTracker` (``mlflow_tracker``) or :class:`NullTracker`, wrapped by the run in a
:class:`BackgroundTracker` (``background``) so tracking overlaps the work. ``store`` finds an
unusable store before any work; ``ui`` makes MLflow's web UI show the runs with their metrics.
MLflow is imported lazily so that ``tracking=none`` works without it.
"""

from ad.tracking.background import BackgroundTracker
from ad.tracking.base import NullTracker, Tracker, config_params, flatten_config, logged_model_name
from ad.tracking.mlflow_tracker import MLflowTracker, quiet_mlflow_logs
from ad.tracking.store import StoreError, check_store, check_tracking, resolve_tracking_uri, sqlite_path, store_folder
from ad.tracking.ui import experiment_url, open_command, run_url

__all__ = [
    "BackgroundTracker",
    "MLflowTracker",
    "NullTracker",
    "StoreError",
    "Tracker",
    "check_store",
    "check_tracking",
    "config_params",
    "experiment_url",
    "flatten_config",
    "logged_model_name",
    "open_command",
    "quiet_mlflow_logs",
    "resolve_tracking_uri",
    "run_url",
    "sqlite_path",
    "store_folder",
]
