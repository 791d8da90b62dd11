"""python -m ad.clean: old run folders and the artifacts of deleted MLflow runs, listed first, removed with --yes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ad.clean import cli, human, run_folders, select

DAY = 86400


def make_run(outputs: Path, name: str, days_old: float, size: int = 1000) -> Path:
    """A run folder with one file of ``size`` bytes, last changed ``days_old`` days ago."""
    folder = outputs / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (folder / "last.pt").write_bytes(bytes(size))
    stamp = time.time() - days_old * DAY
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (stamp, stamp))
    return folder


@pytest.fixture
def outputs(tmp_path) -> Path:
    root = tmp_path / "outputs"
    make_run(root, "runs/new", 0.5)
    make_run(root, "runs/middle", 3, size=2000)
    make_run(root, "runs/old", 20, size=5000)
    make_run(root, "multirun/sweep", 10)  # a whole sweep is one folder
    return root


def test_folders_are_found_newest_first_with_their_size(outputs):
    folders = run_folders(outputs)
    assert [f.path.name for f in folders] == ["new", "middle", "sweep", "old"]
    assert folders[-1].size == 5000 + len("seed: 1\n")


def test_selection_by_age_or_rank():
    from ad.clean import Folder

    now = time.time()

    folders = [Folder(Path(str(i)), 1, now - days * DAY) for i, days in enumerate([0, 2, 8, 30])]
    assert [f.path.name for f in select(folders, 7, None, now)] == ["2", "3"]
    assert [f.path.name for f in select(folders, None, 1, now)] == ["1", "2", "3"]
    assert [f.path.name for f in select(folders, 20, 3, now)] == ["3"]
    assert select(folders, None, None, now) == []


def test_a_dry_run_lists_and_removes_nothing(outputs, capsys):
    assert cli(["--outputs", str(outputs), "--older-than", "7", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 run folder(s)" in out and "(6.0 kB)" in out
    assert "runs/old" in out and "multirun/sweep" in out and "runs/middle" not in out
    assert "add --yes" in out
    assert sorted(f.path.name for f in run_folders(outputs)) == ["middle", "new", "old", "sweep"]


def test_yes_removes_beyond_the_newest_n(outputs, capsys):
    assert cli(["--outputs", str(outputs), "--keep", "2", "--no-mlflow", "--yes"]) == 0
    assert "removed 2 run folder(s)" in capsys.readouterr().out
    assert [f.path.name for f in run_folders(outputs)] == ["new", "middle"]


def test_human_sizes():
    assert [human(n) for n in (12, 1500, 2_500_000, 7.2e9)] == ["12 B", "1.5 kB", "2.5 MB", "7.2 GB"]


def test_deleted_runs_lose_their_artifacts_and_logged_models(tracking_uri, tmp_path, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("ad", artifact_location=(tmp_path / "mlartifacts").as_uri())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(bytes(30_000))
    runs = {}
    for name in ("kept", "deleted"):
        run = client.create_run(experiment, run_name=name)
        client.log_text(run.info.run_id, "x" * 20_000, "big.txt")
        model = client.create_logged_model(experiment, name=name, source_run_id=run.info.run_id)
        client.log_model_artifacts(model.model_id, str(tmp_path / "model"))
        client.set_terminated(run.info.run_id)
        runs[name] = (run, model)
    client.delete_run(runs["deleted"][0].info.run_id)
    folders = {name: Path(run.info.artifact_uri.removeprefix("file://")) for name, (run, _) in runs.items()}
    assert all(folder.is_dir() for folder in folders.values())

    assert cli(["--tracking-uri", tracking_uri]) == 0  # dry run
    out = capsys.readouterr().out
    assert "would remove 1 deleted MLflow run(s) and 1 logged model(s)" in out and "(50.0 kB of local artifacts)" in out
    assert folders["deleted"].is_dir()

    assert cli(["--tracking-uri", tracking_uri, "--yes"]) == 0
    assert not folders["deleted"].exists() and folders["kept"].is_dir()
    remaining = client.search_logged_models([experiment])
    assert [m.name for m in remaining] == ["kept"]
    with pytest.raises(Exception, match="not found|does not exist|No Run"):
        client.get_run(runs["deleted"][0].info.run_id)
    assert client.get_run(runs["kept"][0].info.run_id).info.lifecycle_stage == "active"


def test_an_unusable_store_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database")
    result = subprocess.run([sys.executable, "-m", "ad.clean"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "is not an SQLite database" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
