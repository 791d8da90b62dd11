"""Reading runs from MLflow for the reports: the store, the experiment (the config's default one), its runs."""

from __future__ import annotations

from omegaconf import OmegaConf

from ad.errors import ADError


def default_experiment() -> str:
    """The experiment training logs to by default (``experiment`` in ``conf/tracking/mlflow.yaml``)."""
    from ad.launch import CONF_DIR

    return str(OmegaConf.load(CONF_DIR / "tracking" / "mlflow.yaml").experiment)


def open_client(uri: str | None):
    """An MLflow client on ``uri`` (training's default when None); a missing SQLite file is an error."""
    from mlflow import MlflowClient

    from ad.tracking import quiet_mlflow_logs, resolve_tracking_uri, sqlite_path

    quiet_mlflow_logs()
    resolved = resolve_tracking_uri(uri)
    db = sqlite_path(resolved)
    if db is not None and not db.is_file():
        raise ADError(f"--tracking-uri: no MLflow store at {db}; pass the sqlite:/// or http:// URI the runs used")
    return MlflowClient(resolved)


def fetch_runs(client, experiment: str, sweep: str | None) -> list:
    """Every run of the experiment (optionally of one sweep, the ``ad.sweep`` tag), newest first."""
    from ad.sweep import SWEEP_TAG

    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments()))
        raise ADError(f"--experiment: no experiment named {experiment!r}; available: {names or 'none'}")
    query = f"tags.`{SWEEP_TAG}` = '{sweep}'" if sweep else ""
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=query, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
