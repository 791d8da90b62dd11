"""Benchmark tables from an MLflow store: latest finished run per category, blanks, failures, CSV."""

import csv
import time

import pytest
from mlflow import MlflowClient

import ad.report.tables
from ad.report import main, report

ROUND = 3


def log_run(client, experiment_id, category, metrics, *, model="padim", dataset="toy", status="FINISHED",
            error=None, start=None):
    tags = {"ad.model": model, "ad.backbone": "resnet18", "ad.dataset": dataset, "ad.category": category,
            "ad.weights": "random"}
    if error:
        tags["error"] = error
    run = client.create_run(experiment_id, tags=tags, start_time=start)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store (migrating one takes seconds) with a padim and a dfkde table in experiment 'bench'."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    client = MlflowClient(uri)
    eid = client.create_experiment("bench")
    now = int(time.time() * 1000)
    full = {"image_AUROC": 0.5, "image_F1": 0.5, "pixel_AUROC": 0.5, "pixel_AUPRO": 0.5}
    log_run(client, eid, "bottle", full, start=now - 60_000)  # older, superseded
    latest = log_run(client, eid, "bottle", {**full, "image_AUROC": 0.9, "pixel_AUPRO": 0.7}, start=now)
    log_run(client, eid, "cable", {**full, "image_AUROC": 0.7, "pixel_AUPRO": 0.3}, start=now)
    log_run(client, eid, "screw", {}, status="FAILED", error="ADError: dataset.root: no such folder", start=now)
    log_run(client, eid, "bottle", {"image_AUROC": 0.95, "image_F1": 0.9}, model="dfkde", start=now)  # no pixel
    client.create_run(eid, tags={"note": "not an ad run"})  # ignored
    return uri, latest


def test_tables_take_the_latest_finished_run_and_leave_missing_metrics_blank(store, tmp_path):
    uri, latest = store
    text = report("bench", uri, tmp_path)
    padim = text.split("### toy · padim · resnet18 (weights: random)")[1]
    assert "| bottle | 0.900 | 0.500 | 0.500 | 0.700 |" in padim
    assert "| cable | 0.700 | 0.500 | 0.500 | 0.300 |" in padim
    assert "| screw |  |  |  |  |" in padim  # failed: blank, never 0
    assert "| **Average*** | **0.800** | **0.500** | **0.500** | **0.500** |" in padim  # over bottle and cable
    assert "Image AUROC 2/3" in padim
    assert "bottle: 2 finished runs; the latest" in padim and latest[:8] in padim
    assert "screw: FAILED" in padim and "dataset.root: no such folder" in padim
    dfkde = text.split("### toy · dfkde · resnet18 (weights: random)")[1].split("###")[0]
    assert "| bottle | 0.950 | 0.900 |  |  |" in dfkde
    assert "| **Average** | **0.950** | **0.900** |  |  |" in dfkde
    assert (tmp_path / "bench.md").read_text() == text


def test_csv_has_every_row_with_blanks_for_missing_metrics(store, tmp_path):
    uri, latest = store
    report("bench", uri, tmp_path)
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    by_key = {(r["model"], r["category"]): r for r in rows}
    assert float(by_key["padim", "bottle"]["image_AUROC"]) == pytest.approx(0.9)
    assert by_key["padim", "bottle"]["run_id"] == latest and by_key["padim", "bottle"]["finished_runs"] == "2"
    assert by_key["padim", "screw"]["image_AUROC"] == "" and by_key["dfkde", "bottle"]["pixel_AUROC"] == ""
    assert round(float(by_key["padim", "Average"]["image_AUROC"]), ROUND) == 0.8


def test_categories_never_run_show_as_blank_rows(store, tmp_path, monkeypatch):
    monkeypatch.setattr(ad.report.tables, "known_categories", lambda dataset: ["cable", "bottle", "zipper"])
    text = report("bench", store[0], None)
    padim = text.split("### toy · padim")[1].split("###")[0]
    rows = [line.split("|")[1].strip() for line in padim.splitlines() if line.startswith("| ")][1:]
    assert rows == ["cable", "bottle", "zipper", "screw", "**Average***"]  # known order, then the others


def test_command_line_prints_and_writes(store, tmp_path, capsys):
    main(["--experiment", "bench", "--tracking-uri", store[0], "--out", str(tmp_path / "out")])
    assert "### toy · padim" in capsys.readouterr().out
    assert (tmp_path / "out" / "bench.md").is_file() and (tmp_path / "out" / "bench.csv").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope"], "no experiment named 'nope'; available: Default, bench"),
    (["--experiment", "bench", "--sweep", "2020-01-01_00-00-00"], "no ad runs in sweep"),
])
def test_bad_input_is_one_line_and_writes_nothing(store, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--tracking-uri", store[0], "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_missing_store_is_an_error_not_a_new_empty_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--experiment", "bench", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
