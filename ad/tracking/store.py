"""Where runs are stored: the tracking URI, a probe that finds an unusable store before any work, and
the space kept beside a SQLite store so that a run can still be ended when its disk fills."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ad.errors import ADError, ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

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


def resolve_tracking_uri(uri: str | None) -> str:
    """Return the URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative SQLite paths are made absolute so the store does not move with the working directory.
    """
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


def is_mlflow(node: DictConfig | None) -> bool:
    """Whether a ``tracking`` config node picks the MLflow tracker."""
    return node is not None and str(node.get("_target_", "")).endswith(".MLflowTracker")


def check_tracking(node: DictConfig | None) -> None:
    """Probe the store of a ``tracking`` config node (MLflow only) before any work, see ``check_store``."""
    if is_mlflow(node):
        check_store(node.get("uri"))


def store_folder(node: DictConfig | None) -> Path | None:
    """The folder of the SQLite store of a ``tracking`` config node; None for other stores and trackers."""
    if not is_mlflow(node):
        return None
    db = sqlite_path(resolve_tracking_uri(node.get("uri")))
    return db.parent if db is not None else None


def check_store(uri: str | None) -> None:
    """Raise StoreError naming the URI and what to do when the tracking store cannot be used.

    Found at start-up in a second or so, not after fit and test as MLflow's retries would find it:
    a server must answer within ``PROBE_TIMEOUT_S``; a SQLite file must be a database (or absent),
    readable and writable, in a writable folder with space left. Other stores are not probed.
    """
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


class DiskReserve:
    """``RESERVE_BYTES`` kept beside a SQLite store while a run is open: on a full disk SQLite needs room
    to write the run's end, and :meth:`release` frees this for it. Best effort: no reserve, no error."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def take(self, db: Path, owner: object) -> None:
        """Write the reserve beside ``db`` (once), after removing those of processes killed outright."""
        if self.path is not None:
            return
        for stale in db.parent.glob(f".{db.name}.reserve-*"):
            pid = stale.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
        path = db.parent / f".{db.name}.reserve-{os.getpid()}-{id(owner):x}"
        try:
            with open(path, "wb") as file:
                file.write(bytes(RESERVE_BYTES))  # written, not sparse: the blocks are really taken
            self.path = path
        except OSError:
            path.unlink(missing_ok=True)

    def release(self) -> bool:
        """Delete the reserve file; True when there was one."""
        path, self.path = self.path, None
        if path is None:
            return False
        try:
            path.unlink(missing_ok=True)
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
