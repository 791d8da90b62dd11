"""``python -m ad.clean``: free the disk that old runs take, run folders and MLflow artifacts alike.

Run folders under ``outputs/`` (each ``outputs/runs/<run>`` and each sweep ``outputs/multirun/<sweep>``)
are removed when older than ``--older-than`` days or beyond the newest ``--keep``. In the MLflow
store, runs deleted in the UI keep their artifacts until ``mlflow gc`` purges them; their logged
models (stored apart from the run in MLflow 3) are marked deleted first so that the purge takes
them too. Nothing is removed without ``--yes``: the command lists what would go and how much.

Examples::

    python -m ad.clean --older-than 14          # list what is older than two weeks
    python -m ad.clean --keep 20 --yes          # keep the newest 20 run folders, purge deleted MLflow runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

#: Folders under the outputs folder whose children are one run (or one sweep) each.
RUN_PARENTS = ("runs", "multirun")
DAY_S = 86400.0


@dataclass(frozen=True)
class Folder:
    """One run or sweep folder: where, how big, and when anything in it last changed."""

    path: Path
    size: int
    modified: float


def measure(path: Path) -> Folder:
    """Size and latest modification time of everything under ``path``."""
    size, modified = 0, path.stat().st_mtime
    for file in path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            stat = file.stat()
            size, modified = size + stat.st_size, max(modified, stat.st_mtime)
    return Folder(path, size, modified)


def run_folders(outputs: Path) -> list[Folder]:
    """Every run and sweep folder under ``outputs``, newest first."""
    found = [measure(child) for parent in RUN_PARENTS if (outputs / parent).is_dir()
             for child in (outputs / parent).iterdir() if child.is_dir() and not child.is_symlink()]
    return sorted(found, key=lambda folder: folder.modified, reverse=True)


def select(folders: list[Folder], older_than_days: float | None, keep: int | None, now: float) -> list[Folder]:
    """The folders (newest first) older than ``older_than_days`` or beyond the newest ``keep``."""
    return [folder for rank, folder in enumerate(folders)
            if (keep is not None and rank >= keep)
            or (older_than_days is not None and now - folder.modified > older_than_days * DAY_S)]


def human(size: float) -> str:
    """A byte count as people read it (``1.2 GB``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def local_size(uri: str | None) -> int:
    """Bytes under a ``file://`` artifact location; 0 for remote stores, whose size is not known here."""
    if not uri or not uri.startswith("file:"):
        return 0
    path = Path(unquote(urlparse(uri).path))
    return measure(path).size if path.is_dir() else 0


@dataclass(frozen=True)
class Purge:
    """What ``mlflow gc`` would free in one store: deleted runs, and logged models of deleted runs."""

    run_ids: list[str]
    model_ids: list[str]
    size: int


def deleted_in_store(uri: str) -> Purge:
    """The deleted runs of every experiment in ``uri`` and the logged models they produced."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return Purge([], [], 0)
    runs = client.search_runs(experiments, run_view_type=ViewType.DELETED_ONLY, max_results=50000)
    run_ids = [run.info.run_id for run in runs]
    models = [model for model in client.search_logged_models(experiments)
              if model.source_run_id in set(run_ids)] if run_ids else []
    size = sum(local_size(run.info.artifact_uri) for run in runs)
    size += sum(local_size(model.artifact_location) for model in models)
    return Purge(run_ids, [model.model_id for model in models], size)


def purge(uri: str, deleted: Purge) -> None:
    """Mark the deleted runs' logged models deleted, then let ``mlflow gc`` remove everything deleted in ``uri``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for model_id in deleted.model_ids:
        client.delete_logged_model(model_id)
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri], check=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.DEVNULL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ad.clean", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Examples::", 1)[1])
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="folder holding runs/ and multirun/")
    parser.add_argument("--older-than", type=float, metavar="DAYS", help="remove run folders older than DAYS")
    parser.add_argument("--keep", type=int, metavar="N", help="remove run folders beyond the newest N")
    parser.add_argument("--tracking-uri", help="MLflow store whose deleted runs to purge (default: as ad.launch)")
    parser.add_argument("--no-mlflow", action="store_true", help="leave the MLflow store alone")
    parser.add_argument("--yes", action="store_true", help="remove for real (default: only list)")
    args = parser.parse_args(argv)
    if args.keep is not None and args.keep < 0:
        parser.error(f"--keep: must be 0 or more, got {args.keep}")
    if args.older_than is not None and args.older_than < 0:
        parser.error(f"--older-than: must be 0 or more days, got {args.older_than:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    """List (or with ``--yes`` remove) old run folders and the artifacts of deleted MLflow runs."""
    args = parse_args(argv)
    verb = "removed" if args.yes else "would remove"
    chosen = []
    if args.older_than is not None or args.keep is not None:
        chosen = select(run_folders(args.outputs), args.older_than, args.keep, time.time())
        print(f"{verb} {len(chosen)} run folder(s) under {args.outputs} ({human(sum(f.size for f in chosen))})")
        for folder in chosen:
            age = (time.time() - folder.modified) / DAY_S
            print(f"  {folder.path}  {human(folder.size)}, {age:.1f} days old")
            if args.yes:
                shutil.rmtree(folder.path)
    if not args.no_mlflow:
        clean_store(args.tracking_uri, args.yes, verb)
    if not args.yes:
        print("dry run: nothing was removed; add --yes to remove it")
    return 0


def clean_store(tracking_uri: str | None, really: bool, verb: str) -> None:
    """Report (with ``really``: purge) the deleted runs of the MLflow store; a missing SQLite file stays absent."""
    from ad.tracking import check_store, quiet_mlflow_logs, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        print(f"no MLflow store at {db}")
        return
    check_store(tracking_uri)
    quiet_mlflow_logs()
    deleted = deleted_in_store(uri)
    print(f"{verb} {len(deleted.run_ids)} deleted MLflow run(s) and {len(deleted.model_ids)} logged model(s) "
          f"of them from {uri} ({human(deleted.size)} of local artifacts)")
    if really and (deleted.run_ids or deleted.model_ids):
        purge(uri, deleted)


def cli(argv: list[str] | None = None) -> int:
    """``main`` with ``ad``'s errors as one ``error:`` line and exit 2."""
    from ad.errors import ADError

    try:
        return main(argv)
    except ADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
