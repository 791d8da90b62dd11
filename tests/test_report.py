"""Reports from an MLflow store: latest finished run per category, sweeps compared by setting, the HTML page."""

import base64
import csv
import io
import json
import re
import time
from types import SimpleNamespace
from xml.etree import ElementTree

import pytest
from mlflow import MlflowClient

import ad.report.tables
from ad.errors import ADError
from ad.report import default_experiment, main, report
from ad.report.artifacts import read_predictions
from ad.report.tables import COLUMNS, varied_params

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
    main(["--experiment", "bench", "--tracking-uri", store[0], "--out", str(tmp_path / "out"), "--html"])
    assert "### toy · padim" in capsys.readouterr().out
    assert (tmp_path / "out" / "bench.md").is_file() and (tmp_path / "out" / "bench.csv").is_file()
    page = (tmp_path / "out" / "bench.html").read_text()  # runs with metrics only: their tables and facts
    assert page.count("<details") == 3 and "No per-image predictions" in page and "<img" not in page


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope"], "no experiment named 'nope'; available: Default, bench"),
    (["--experiment", "bench", "--sweep", "2020-01-01_00-00-00"], "no ad runs in sweep"),
    (["--experiment", "bench", "--html", "."], "--html .: is a folder"),
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


# -- comparing the settings of a sweep, and the HTML page ---------------------------------------------------------

SWEEP = "2026-01-02_03-04-05"
#: Test images of every fixture run: (defect, score); the threshold 1.0 flags scores >= 1.
IMAGES = [("good", 0.1), ("good", 0.4), ("good", 0.7), ("good", 1.6), ("good", 1.2),
          ("crack", 0.3), ("crack", 2.0), ("hole", 0.8), ("hole", 2.5), ("hole", 1.9)]


def predictions_csv(path, shift: float) -> None:
    lines = ["path,score,label,target,defect"]
    for i, (defect, score) in enumerate(IMAGES):
        score += shift
        lines.append(f"/data/test/{defect}/{i:03d}.png,{score},{int(score >= 1.0)},{int(defect != 'good')},{defect}")
    path.write_text("\n".join(lines) + "\n")


def log_sweep_run(client, eid, category, n_features, metrics, tmp, *, sweep=SWEEP, status="FINISHED", extra=None,
                  predictions=True, start=None):
    """A run as ad.run logs one: flattened config params, ad.* tags, metrics, metrics.json, predictions, overlays."""
    from PIL import Image

    tags = {"ad.model": "padim", "ad.backbone": "resnet18", "ad.dataset": "synthetic", "ad.category": category,
            "ad.weights": "random", "ad.sweep": sweep, "ad.version": "0.1.0"}
    run_id = client.create_run(eid, tags=tags, run_name=f"padim-synthetic-{category}", start_time=start).info.run_id
    params = {"model.n_features": n_features, "seed": 42, "dataset.seed": 42, "dataset.category": category,
              "dataset.image_size": 64, **(extra or {})}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    folder = tmp / run_id
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"weights": "random", "precision": "bf16", "device": "cpu",
                                                     "ad_version": "0.1.0", **metrics}))
    client.log_artifact(run_id, str(folder / "metrics.json"))
    if predictions:
        predictions_csv(folder / "predictions.csv", shift=0.0)
        client.log_artifact(run_id, str(folder / "predictions.csv"))
        overlays = folder / "anomaly_maps"
        overlays.mkdir()
        for i in (0, 5, 3):  # a good image, a false accept (crack 0.3), a false reject (good 1.6)
            Image.new("RGB", (600, 300), (40 * i, 90, 200)).save(overlays / f"{i:03d}_{IMAGES[i][0]}_{i:03d}.png")
        client.log_artifacts(run_id, str(overlays), "anomaly_maps")
    client.set_terminated(run_id, status)
    return run_id


def scores(auroc, aupro=0.5):
    return {"image_AUROC": auroc, "image_F1": 0.6, "pixel_AUROC": 0.7, "pixel_AUPRO": aupro, "fit_s": 1.0,
            "test_s": 0.5, "image_threshold": 1.0, "image_precision": 0.75, "image_recall": 0.6,
            "image_false_reject_rate": 0.4, "image_false_accept_rate": 0.4}


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """Experiment 'sweep': PaDiM n_features 10 and 20 on brick and grass in one sweep (one with a param the
    others lack, one repeated), an older run with 30 and no predictions, a failed 40 on grass."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    eid = client.create_experiment("sweep")
    now = int(time.time() * 1000)
    ids = {
        ("brick", 10): log_sweep_run(client, eid, "brick", 10, scores(0.80, 0.6), tmp, start=now),
        ("brick", 20): log_sweep_run(client, eid, "brick", 20, scores(0.90, 0.4), tmp, start=now,
                                     extra={"threshold.method": "frr"}),  # a newer config key: not a setting
        ("grass", 10): log_sweep_run(client, eid, "grass", 10, scores(0.70, 0.3), tmp, start=now),
        ("grass", 20): log_sweep_run(client, eid, "grass", 20, scores(0.60, 0.2), tmp, start=now),
        ("brick", 30): log_sweep_run(client, eid, "brick", 30, {"image_AUROC": 0.5}, tmp, sweep="old",
                                     predictions=False, start=now - 120_000),
    }
    log_sweep_run(client, eid, "grass", 20, scores(0.1), tmp, start=now - 60_000)  # superseded repeat
    log_sweep_run(client, eid, "grass", 40, {}, tmp, status="FAILED", predictions=False, start=now)
    return uri, ids


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_a_sweep_is_compared_setting_by_setting_with_the_best_marked(sweep_store, tmp_path):
    uri, ids = sweep_store
    text = report("sweep", uri, tmp_path, sweep=SWEEP)
    rows = table_rows(text)
    assert rows[0] == ["Category", "model.n_features", "Image AUROC", "Image F1", "Pixel AUROC", "Pixel AUPRO",
                       "Fit+test s"]  # seed, dataset.seed, threshold.method are not compared
    assert rows[1] == ["brick", "10", "0.800", "0.600", "0.700", "**0.600**", "1.500"]
    assert rows[2] == ["brick", "20", "**0.900**", "0.600", "0.700", "0.400", "1.500"]
    assert rows[3][:3] == ["grass", "10", "**0.700**"] and rows[4][:3] == ["grass", "20", "0.600"]  # latest 20
    assert rows[5] == ["grass", "40", "", "", "", "", ""]  # failed: blank, and noted
    assert "grass, model.n_features=40: FAILED" in text and "grass, model.n_features=20: 2 finished runs" in text
    averages = rows[rows.index(["model.n_features", "Categories", *COLUMNS]) + 1:]
    assert averages[0] == ["10", "2", "0.750", "0.600", "0.700", "**0.450**"]
    assert averages[1] == ["20", "2", "0.750", "0.600", "0.700", "0.300"]
    rows_csv = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert {r["setting"] for r in rows_csv} == {f"model.n_features={n}" for n in (10, 20, 40)}
    assert next(r for r in rows_csv if r["run_id"] == ids["brick", 20])["fit_s"] == "1.0"


def test_without_sweep_every_run_of_the_experiment_is_compared(sweep_store):
    text = report("sweep", sweep_store[0])
    rows = table_rows(text)
    assert ["brick", "30", "0.500", "", "", "", ""] in rows
    assert ["30", "1", "0.500", "", "", ""] in rows  # an average over the one category that ran it


def test_params_that_differ_only_across_categories_or_only_in_some_runs_are_not_settings():
    run = lambda category, **params: SimpleNamespace(data=SimpleNamespace(
        params={k.replace("_", "."): str(v) for k, v in params.items()}, tags={"ad.category": category}))
    runs = [run("a", seed=1, dataset_seed=1, dataset_category="a", model_k=5),
            run("a", seed=2, dataset_seed=2, dataset_category="a", model_k=5, new_key=1),
            run("b", seed=1, dataset_seed=1, dataset_category="b", model_k=6)]
    assert varied_params(runs) == ["seed"]  # dataset.seed repeats it; model.k differs only between categories
    assert varied_params(runs[2:]) == []


def test_the_default_experiment_is_the_configs(sweep_store, tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from ad.launch import CONF_DIR

    assert default_experiment() == OmegaConf.load(CONF_DIR / "tracking" / "mlflow.yaml").experiment
    monkeypatch.setattr(ad.report, "default_experiment", lambda: "sweep")
    main(["--tracking-uri", sweep_store[0], "--out", str(tmp_path)])
    assert "model.n_features" in capsys.readouterr().out and (tmp_path / "sweep.md").is_file()


def data_uris(page: str) -> list[tuple[str, bytes]]:
    return [(kind, base64.b64decode(data)) for kind, data in re.findall(r'src="data:([^;]+);base64,([^"]+)"', page)]


def test_html_is_one_self_contained_page_with_curves_histograms_and_misses(sweep_store, tmp_path, capsys):
    from PIL import Image

    uri, ids = sweep_store
    main(["--experiment", "sweep", "--tracking-uri", uri, "--out", str(tmp_path), "--html"])
    page = (tmp_path / "sweep.html").read_text()
    assert "HTML report:" in capsys.readouterr().err and "Downloading artifacts" not in page
    assert re.findall(r'(?:src|href)="(?!data:)', page) == [] and "http" not in page.replace("http-equiv", "")
    images = data_uris(page)
    kinds = [kind for kind, _ in images]
    assert kinds.count("image/svg+xml") == 1 + 4 and kinds.count("image/jpeg") == 4 * 2  # sweep plot, 4 runs
    for kind, data in images:  # every image decodes
        if kind == "image/svg+xml":
            ElementTree.fromstring(data)
        else:
            assert Image.open(io.BytesIO(data)).size == (560, 280)  # overlays shrunk
    assert "False accepts: 2 (" in page and "False rejects: 2 (" in page
    assert page.index("crack · score 0.3") < page.index("hole · score 0.8")  # the worst miss first
    assert "crack · score 0.3 · 005.png" in page and "good · score 1.6 · 003.png" in page  # worst first
    assert "good · score 1.2 · 004.png" in page and "no overlay logged for this image" in page
    assert "No per-image predictions (predictions.csv)" in page  # the old run
    assert "false reject rate" in page and "precision</dt><dd>bf16" in page and ids["brick", 20] in page
    assert len(page) < 300_000


def test_a_run_without_labels_takes_its_misses_from_the_threshold(tmp_path):
    file = tmp_path / "predictions.csv"
    file.write_text("path,score,label,target,defect\na.png,0.2,,0,good\nb.png,0.9,,0,good\nc.png,0.5,,1,crack\n")
    pred = read_predictions(file)
    assert pred.flagged(None) is None
    misses = pred.misses(pred.flagged(0.6))
    assert misses["false accept"].tolist() == [2] and misses["false reject"].tolist() == [1]


def test_html_failure_writes_nothing(sweep_store, tmp_path, monkeypatch):
    import ad.report.html

    def broken(*args, **kwargs):
        raise ADError("cannot draw")

    monkeypatch.setattr(ad.report.html, "page", broken)
    with pytest.raises(SystemExit):
        main(["--experiment", "sweep", "--tracking-uri", sweep_store[0], "--out", str(tmp_path / "out"), "--html"])
    assert not (tmp_path / "out").exists()
