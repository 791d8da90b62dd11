"""What MLflow's web UI shows for ``ad``'s experiments: model training rather than GenAI, with the metrics as columns.

MLflow 3 opens an experiment on a GenAI overview unless told otherwise. Its earlier UIs read the
experiment's ``mlflow.experimentKind`` tag (set here to ``custom_model_development``); the UI of
MLflow 3.17 follows a per-browser switch instead (GenAI | Model training, default GenAI, kept in the
browser's local storage), which a link overrides with ``workflowType=machine_learning``. The runs
table's default columns are fixed in the UI (source, models, dataset); what a link can carry is a
shared view: an experiment tag ``mlflow.sharedViewState.<key>`` holding the table's state, as the
UI's own *Share* button stores it, here with the metric columns. :func:`experiment_url` builds that link.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode

#: The experiment tag MLflow's UI reads for an experiment's type, and the value meaning model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
#: The URL parameter and value that open the model-training view whatever the browser last used.
WORKFLOW_PARAM = {"workflowType": "machine_learning"}
#: Prefix of the experiment tags holding shared views of the runs table, and the key of ``ad``'s view.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "ad-metrics"
#: Where ``mlflow ui`` serves when started without options.
DEFAULT_UI = "http://127.0.0.1:5000"


def column_key(kind: str, name: str) -> str:
    """A runs-table column as the UI names it: ``metrics.`image_AUROC```."""
    return f"{kind}.`{name}`"


def experiment_tags(metric_columns: Sequence[str]) -> dict[str, str]:
    """Experiment tags making the UI treat the experiment as model training and offer a view with ``metric_columns``."""
    view = {"selectedColumns": [*(column_key("metrics", name) for name in metric_columns),
                                column_key("attributes", "Models")]}
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING, f"{SHARED_VIEW_PREFIX}{VIEW_KEY}": json.dumps(view)}


def ui_address(uri: str) -> str:
    """The web address showing the runs of store ``uri``: the server itself, or ``mlflow ui``'s for a local store."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_UI


def experiment_url(uri: str, experiment_id: str, with_view: bool = True) -> str:
    """The link opening an experiment on its runs table for model training (with the metric columns' view)."""
    query = dict(WORKFLOW_PARAM)
    if with_view:
        query["viewStateShareKey"] = VIEW_KEY
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The link to one run's page."""
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{urlencode(WORKFLOW_PARAM)}"


def open_command(uri: str) -> str:
    """The command that serves the UI for store ``uri`` (nothing to start for a server)."""
    if uri.startswith(("http://", "https://")):
        return ""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db == Path.cwd().resolve() / "mlflow.db":
            return "mlflow ui"
    return f"mlflow ui --backend-store-uri {uri}"
