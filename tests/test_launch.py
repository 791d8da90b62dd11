"""End to end: the command line, a whole run per dataset format, and every bad-input path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, compose_config
from mlflow.tracking import MlflowClient

import ad
from ad.data.synthetic import make_mvtec_layout
from ad.errors import ADError
from ad.run import run

TINY_SYNTHETIC = ["dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6"]


def make_cfg(*overrides: str):
    return compose_config(*TINY, *overrides)


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ad.launch", *overrides], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_layout(root, "widget", n_train=10, n_test_good=5, n_test_defect=5, image_size=64, seed=0)
    return root


def test_default_command_runs_end_to_end_and_tracks(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = launch(tmp_path, "dataset.image_size=64", *TINY_SYNTHETIC, f"hydra.run.dir={tmp_path}/run",
                    f"tracking.uri={uri}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("image_AUROC", "image_F1", "pixel_AUROC", "pixel_AUPRO", "fit_s", "test_s"):
        assert isinstance(metrics[key], float)
    assert metrics["weights"] in ("imagenet", "random")
    assert "image_AUROC" in result.stdout  # the results table
    client, mlflow_run = only_run(uri)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.metrics["image_AUROC"] == pytest.approx(metrics["image_AUROC"])
    assert mlflow_run.data.params["model.n_features"] == "None"
    assert mlflow_run.data.tags["ad.weights"] == metrics["weights"]
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"metrics.json", "anomaly_maps", "config"} <= artifacts
    assert client.list_artifacts(mlflow_run.info.run_id, "anomaly_maps")


def test_padim_separates_synthetic_defects(tmp_path):
    results = run(make_cfg("tracking=none", *TINY_SYNTHETIC), tmp_path)
    assert results["image_AUROC"] > 0.8 and results["pixel_AUROC"] > 0.8


def test_mvtec_layout_gives_image_and_pixel_metrics(tmp_path, mvtec_root):
    cfg = make_cfg("dataset=mvtec", f"dataset.root={mvtec_root}", "dataset.category=widget", "tracking=none")
    results = run(cfg, tmp_path)
    assert results["n_train"] + results["n_val"] == 10 and results["n_test"] == 10  # val: held-out good images
    assert {"image_AUROC", "image_F1", "pixel_AUROC", "pixel_AUPRO"} <= results.keys()
    assert json.loads((tmp_path / "metrics.json").read_text()) == results


def test_folder_without_masks_skips_pixel_metrics(tmp_path, mvtec_root):
    category = mvtec_root / "widget"
    defect = next(p for p in (category / "test").iterdir() if p.name != "good")
    cfg = make_cfg("dataset=folder", f"dataset.normal_dir={category / 'train' / 'good'}",
                   f"dataset.abnormal_dir={defect}", "tracking=none")
    results = run(cfg, tmp_path)
    assert "image_AUROC" in results
    assert "pixel_AUROC" not in results and "pixel_AUPRO" not in results


def test_config_typo_is_one_line_with_a_suggestion(tmp_path):
    result = launch(tmp_path, "dataset.categroy=bottle")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "dataset.categroy" in result.stderr and "dataset.category" in result.stderr


def test_unknown_option_lists_the_available_ones(tmp_path):
    result = launch(tmp_path, "model=padm")
    assert result.returncode == 2 and "padim" in result.stderr and result.stderr.strip().count("\n") == 0


def test_missing_root_is_rejected_before_any_tracking_run(tmp_path, tracking_uri):
    result = launch(tmp_path, "dataset=mvtec", f"dataset.root={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run",
                    f"tracking.uri={tracking_uri}", "backbone.weights=random")
    assert result.returncode == 2  # the dataset is listed before the tracker opens a run
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "dataset.root" in error_lines[0]
    assert result.stderr.strip().splitlines()[-1] == error_lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    client = MlflowClient(tracking_uri)
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize(("overrides", "key"), [
    (["dataset.category=nothing_like_this"], "dataset.category"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.precision=fp8"], "trainer.precision"),
    (["backbone.weights=/no/such/file.pth"], "backbone.weights"),
    (["backbone.name=resnet50"], "model.n_features"),
])
def test_bad_settings_name_their_key(tmp_path, overrides, key):
    with pytest.raises(ADError, match=key):
        run(make_cfg("tracking=none", *overrides), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_corrupt_image_fails_the_run_naming_the_file(tmp_path, mvtec_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(mvtec_root, root)
    victim = sorted((root / "widget" / "test" / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated PNG
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("dataset=mvtec", f"dataset.root={root}", "dataset.category=widget", f"tracking.uri={uri}")
    with pytest.raises(ADError, match=victim.name):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert only_run(uri)[1].info.status == "FAILED"


def test_errors_raised_in_loader_workers_stay_one_line(tmp_path, mvtec_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(mvtec_root, root)
    victim = sorted((root / "widget" / "train" / "good").iterdir())[0]
    victim.write_bytes(b"not an image")
    result = launch(tmp_path, "dataset=mvtec", f"dataset.root={root}", "dataset.category=widget", "tracking=none",
                    "trainer.num_workers=1", "runtime.feature_cache=false", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and victim.name in error_lines[0] and "Traceback" not in result.stderr


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import ad.launch

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.launch, "_hydra_main", interrupted)
    monkeypatch.setattr(sys, "argv", ["ad.launch", "tracking=none"])
    with pytest.raises(SystemExit) as exit_info:
        ad.launch.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted (Ctrl-C)"


@pytest.fixture
def hydra_job(tmp_path):
    """The Hydra context a job runs in, for calling ``run_job`` directly."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from ad.launch import CONF_DIR

    def make(*overrides: str):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"hydra.runtime.output_dir={tmp_path}"],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_the_sweeper_gets_the_optimized_metric(hydra_job, monkeypatch, capsys):
    import ad.launch
    import ad.run
    import ad.summary

    monkeypatch.setattr(ad.run, "run", lambda cfg, run_dir, started: {"image_AUROC": 0.9, "pixel_AUPRO": 0.4,
                                                                       "fit_s": 2.0})
    monkeypatch.setattr(ad.summary, "format_table", lambda results: f"table of {len(results)} results")
    assert ad.launch.run_job(hydra_job("tracking=none")) == 0.9
    assert capsys.readouterr().out == "table of 3 results\n"  # the command line prints; run() does not
    assert ad.launch.run_job(hydra_job("tracking=none", "optimized_metric=pixel_AUPRO")) == 0.4
    assert ad.launch.run_job(hydra_job("tracking=none", "optimized_metric=fit_s")) == 2.0
    assert ad.launch.run_job(hydra_job("tracking=none", "optimized_metric=pixel_AUROC")) is None  # not produced


def test_an_unknown_optimized_metric_is_one_line_before_the_run(hydra_job, monkeypatch, capsys):
    import ad.launch
    import ad.run

    def must_not_run(cfg, run_dir, started):
        raise AssertionError("ran")

    monkeypatch.setattr(ad.run, "run", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        ad.launch.run_job(hydra_job("tracking=none", "optimized_metric=image_AUC"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: optimized_metric: 'image_AUC' is not a result") and "image_AUROC" in err


def test_a_patchcore_run_prints_no_library_loader_noise(tmp_path, monkeypatch, tracking_uri):
    # faiss logged which CPU build it loaded, with a ModuleNotFoundError for each one it skipped, and
    # matplotlib announced its font cache on a machine's first run (a fresh MPLCONFIGDIR here).
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    done = launch(tmp_path, "model=patchcore", "backbone=resnet18", f"tracking.uri={tracking_uri}", *TINY,
                  *TINY_SYNTHETIC)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert not any(noise in output for noise in ("faiss.loader", "ModuleNotFoundError", "fontManager"))


def test_help_and_version_describe_ad():
    helped = subprocess.run([sys.executable, "-m", "ad.launch", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("ad: visual anomaly detection")
    assert "ad.predict" in helped.stdout and "dataset=folder" in helped.stdout
    version = subprocess.run([sys.executable, "-m", "ad.launch", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(f"ad {ad.__version__} · torch ")
