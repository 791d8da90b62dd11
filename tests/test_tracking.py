"""Tests for ad.tracking against a throwaway SQLite MLflow store per test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ad
from ad.errors import ADError
from ad.tracking import MLflowTracker, NullTracker, Tracker, resolve_tracking_uri

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class TinyNet(torch.nn.Module):
    """Smallest model worth logging."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    """Run in tmp_path with no inherited tracking URI; fail if a test leaks an active run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield
    leaked = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run("KILLED")
    mlflow.set_tracking_uri(None)
    assert leaked is None, "test left an MLflow run active"


def make_cfg(with_hydra: bool = True):
    """A composed-looking config: nested groups, an interpolation, a list, a huge value, 120+ keys."""
    cfg = {
        "seed": 0,
        "model": {"_target_": "ad.models.padim.Padim", "n_features": 100, "layers": [1, 2]},
        "dataset": {"category": "bottle", "image_size": 256, "crop": "${dataset.image_size}"},
        "notes": "x" * 7000,
        "many": {f"k{i:03d}": i for i in range(120)},
    }
    if with_hydra:
        cfg["hydra"] = {"runtime": {"choices": {"model": "padim", "dataset": "mvtec",
                                                "hydra/launcher": "basic"}},
                        "run": {"dir": "${now:%Y}"}}
    return OmegaConf.create(cfg)


def started(uri: str, tmp_path: Path, **kwargs) -> MLflowTracker:
    """Return a tracker with a run started on ``make_cfg()``."""
    tracker = MLflowTracker(uri=uri, **kwargs)
    tracker.start(make_cfg(), tmp_path / "run", "padim-bottle", {"ad.model": "padim"})
    return tracker


def test_start_logs_params_tags_config_and_hydra_dir(tracking_uri, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- model=padim\n")
    tracker = MLflowTracker(uri=tracking_uri, experiment="exp1")
    tracker.start(make_cfg(), run_dir, "padim-bottle", {"ad.model": "padim"})
    run_id = tracker.run_id
    tracker.end()
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["model.n_features"] == "100" and params["model.layers"] == "[1, 2]"
    assert params["dataset.crop"] == "256"  # resolved
    assert params["choice.model"] == "padim" and params["choice.dataset"] == "mvtec"
    assert not any(k.startswith(("hydra.", "choice.hydra")) for k in params)
    assert len([k for k in params if k.startswith("many.")]) == 120  # > one 100-param batch
    assert len(params["notes"]) == 6000 and params["notes"].endswith("[truncated]")
    assert tags["ad.model"] == "padim" and tags["ad.version"] == ad.__version__
    assert tags["mlflow.runName"] == "padim-bottle"
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/config.yaml"]
    assert [a.path for a in client.list_artifacts(run_id, "hydra")] == ["hydra/overrides.yaml"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "exp1"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    config_yaml = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="config/config.yaml", tracking_uri=tracking_uri))
    logged = OmegaConf.load(config_yaml)
    assert "hydra" not in logged and logged.dataset.crop == 256


def test_config_without_hydra_node(tracking_uri, tmp_path):
    """Outside a Hydra job, choices are absent and ``${hydra:...}`` stays unresolved (not a crash)."""
    cfg = make_cfg(with_hydra=False)
    cfg.paths = {"out": "${hydra:runtime.output_dir}"}
    tracker = MLflowTracker(uri=tracking_uri)
    tracker.start(cfg, tmp_path, "r", {})
    run_id = tracker.run_id
    tracker.end()
    params = MlflowClient(tracking_uri).get_run(run_id).data.params
    assert params["seed"] == "0" and not any(k.startswith("choice.") for k in params)
    assert params["paths.out"] == "${hydra:runtime.output_dir}"


def test_metrics_and_images(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    tracker.log_metrics({"image_AUROC": 0.975, "pixel_AUROC": np.float32(0.9)})
    tracker.log_metrics({"loss": 1.5}, step=3)
    tracker.set_tags({"ad.weights": "imagenet", "n": 3})
    panel = np.zeros((16, 36, 3), dtype=np.uint8)
    tracker.log_image(panel, "anomaly_maps/000_broken_large.png")
    tracker.log_image(panel, "anomaly_maps/001_good.png")
    report = tmp_path / "report.txt"
    report.write_text("ok")
    tracker.log_artifact(report, "reports")
    run_id = tracker.run_id
    tracker.end()
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["image_AUROC"] == pytest.approx(0.975) and "pixel_AUROC" in metrics
    assert client.get_metric_history(run_id, "loss")[0].step == 3
    tags = client.get_run(run_id).data.tags
    assert tags["ad.weights"] == "imagenet" and tags["n"] == "3"
    names = [a.path for a in client.list_artifacts(run_id, "anomaly_maps")]
    assert names == ["anomaly_maps/000_broken_large.png", "anomaly_maps/001_good.png"]
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]


def test_log_image_rejects_non_uint8(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        tracker.log_image(np.zeros((4, 4, 3)), "anomaly_maps/x.png")
    tracker.end()


def test_end_failed_sets_status_and_error_and_is_idempotent(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    run_id = tracker.run_id
    tracker.end("FAILED", error="CUDA out of memory " * 1000)
    tracker.end("FAILED", error="second call")
    tracker.end()
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["error"].startswith("CUDA out of memory")
    assert run.data.tags["error"].endswith("[truncated]") and len(run.data.tags["error"]) <= 5000
    assert tracker.run_id is None and mlflow.active_run() is None


def test_end_without_start_is_safe(tracking_uri):
    MLflowTracker(uri=tracking_uri).end("FAILED", error="never started")
    MLflowTracker(uri=tracking_uri).end()


def test_start_failing_half_way_leaves_no_running_run(tracking_uri, tmp_path, monkeypatch):
    def broken(self, cfg, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(MLflowTracker, "_log_config", broken)
    tracker = MLflowTracker(uri=tracking_uri)
    with pytest.raises(RuntimeError, match="disk full"):
        tracker.start(make_cfg(), tmp_path, "r", {})
    assert tracker.run_id is None and mlflow.active_run() is None
    tracker.end("FAILED", error="orchestrator ends it again")  # still safe
    runs = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("ad").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "disk full" in runs[0].data.tags["error"]


def test_two_runs_in_one_process(tracking_uri, tmp_path):
    first = started(tracking_uri, tmp_path)
    first.end()
    second = started(tracking_uri, tmp_path)
    second.end("KILLED")
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("ad")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert statuses == ["FINISHED", "KILLED"]


def test_run_nests_under_an_active_parent_run(tracking_uri, tmp_path):
    mlflow.set_tracking_uri(tracking_uri)
    parent = mlflow.start_run(run_name="sweep")
    tracker = started(tracking_uri, tmp_path)
    child_id = tracker.run_id
    tracker.end()
    assert mlflow.active_run().info.run_id == parent.info.run_id  # parent still open
    mlflow.end_run()
    tags = MlflowClient(tracking_uri).get_run(child_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id


def test_deleted_experiment_is_a_user_error(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(ADError, match="tracking.experiment='gone'.*restore"):
        MLflowTracker(uri=tracking_uri, experiment="gone").start(make_cfg(), tmp_path, "r", {})


def fake_bundle(folder: Path) -> Path:
    """A folder shaped like a model bundle (what MLflow copies; ad.serving's tests load a real one)."""
    folder.mkdir(parents=True)
    (folder / "bundle.json").write_text('{"format": "ad-bundle"}')
    (folder / "model.safetensors").write_bytes(b"tensors")
    return folder


def test_log_model_logs_the_bundle_as_a_pyfunc_model(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    tracker.log_model(fake_bundle(tmp_path / "model"), "padim-resnet18-brick")
    run_id = tracker.run_id
    tracker.end()
    outputs = MlflowClient(tracking_uri).get_run(run_id).outputs.model_outputs
    assert len(outputs) == 1
    model = MlflowClient(tracking_uri).get_logged_model(outputs[0].model_id)
    assert model.name == "padim-resnet18-brick"
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", dst_path=str(tmp_path / "dl")))
    assert (local / "artifacts" / "model" / "bundle.json").is_file() or list(local.rglob("bundle.json"))
    assert "python_function" in (local / "MLmodel").read_text() and not list(local.rglob("*.pkl"))


def test_log_model_disabled(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path, log_model=False)
    tracker.log_model(fake_bundle(tmp_path / "model"))
    run_id = tracker.run_id
    tracker.end()
    assert not MlflowClient(tracking_uri).get_run(run_id).outputs.model_outputs


BARE_PATHS = ["./mlruns", "mlruns", "/tmp/mlruns", "file:///tmp/mlruns", "C:\\mlruns"]


@pytest.mark.parametrize("uri", BARE_PATHS)
def test_bare_path_uri_is_a_user_error(uri):
    with pytest.raises(ADError, match=r"tracking\.uri=.*sqlite:///.*http://"):
        MLflowTracker(uri=uri)


def test_bare_path_in_environment_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ADError, match="MLFLOW_TRACKING_URI"):
        MLflowTracker().start(make_cfg(), tmp_path, "r", {})


def test_default_uri_resolution(monkeypatch, tmp_path):
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path.resolve()}/sub/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert resolve_tracking_uri(None) == "http://tracker:5000"


def test_new_db_and_folder_are_created(tmp_path):
    uri = f"sqlite:///{tmp_path}/nested/dir/mlflow.db"
    tracker = MLflowTracker(uri=uri)
    tracker.start(make_cfg(), tmp_path, "r", {})
    tracker.end()
    assert (tmp_path / "nested/dir/mlflow.db").is_file()
    assert (tmp_path / "nested/dir/mlartifacts").is_dir()


def test_null_tracker_does_nothing(tmp_path):
    tracker = NullTracker()
    assert isinstance(tracker, Tracker) and tracker.run_id is None
    tracker.start(make_cfg(), tmp_path, "r", {"a": "b"})
    tracker.log_metrics({"image_AUROC": 1.0})
    tracker.set_tags({"ad.weights": "random"})
    tracker.log_image(np.zeros((2, 2, 3), np.uint8), "anomaly_maps/0.png")
    tracker.log_artifact(tmp_path)
    tracker.log_model(tmp_path / "model")
    tracker.end("FAILED", error="x")
    tracker.end()
    assert list(tmp_path.iterdir()) == []


def test_null_tracker_needs_no_mlflow():
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "from pathlib import Path\n"
        "from ad.tracking import NullTracker\n"
        "t = NullTracker(); t.start({}, Path('.'), 'r', {}); t.log_metrics({'a': 1.0}); t.end()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_tracking_configs_instantiate():
    from hydra.utils import instantiate

    null = instantiate(OmegaConf.load(REPO / "conf/tracking/none.yaml"))
    assert type(null) is NullTracker
    tracker = instantiate(OmegaConf.load(REPO / "conf/tracking/mlflow.yaml"))
    assert isinstance(tracker, MLflowTracker)
    assert tracker.uri is None and tracker.experiment == "ad"
    assert tracker.save_model is True and tracker.num_images == 8 and tracker.run_id is None


class Recorder(Tracker):
    """Records the calls it gets and the thread they ran on; fails on request."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls, self.threads, self.fail_on = [], set(), fail_on
        self.ended: tuple | None = None

    def _record(self, name: str, *args) -> None:
        import threading

        self.threads.add(threading.get_ident())
        self.calls.append((name, *args))
        if name == self.fail_on:
            raise RuntimeError(f"{name} failed")

    def start(self, cfg, run_dir, run_name, tags, resume_run_id=None, start_time=None):
        self._record("start", run_name, start_time)

    def log_metrics(self, metrics, step=None):
        self._record("log_metrics", metrics, step)

    def end(self, status="FINISHED", error=None):
        self.ended = (status, error)


def test_background_tracker_keeps_order_on_one_thread():
    import threading

    from ad.tracking import BackgroundTracker

    inner = Recorder()
    tracker = BackgroundTracker(inner)
    tracker.start(make_cfg(), Path("."), "r", {})
    for step in range(20):
        tracker.log_metrics({"loss": step}, step)
    tracker.end("FINISHED")
    assert [c[0] for c in inner.calls] == ["start"] + ["log_metrics"] * 20
    assert [c[2] for c in inner.calls[1:]] == list(range(20))
    assert len(inner.threads) == 1 and threading.get_ident() not in inner.threads
    assert inner.ended == ("FINISHED", None)


def test_background_tracker_reports_a_failed_call():
    from ad.tracking import BackgroundTracker

    inner = Recorder(fail_on="log_metrics")
    tracker = BackgroundTracker(inner)
    tracker.start(make_cfg(), Path("."), "r", {})
    tracker.log_metrics({"a": 1.0})
    with pytest.raises(RuntimeError, match="log_metrics failed"):
        tracker.wait()
    tracker.end("FINISHED")
    assert inner.ended == ("FINISHED", None)  # the failure was already raised to the caller

    inner = Recorder(fail_on="log_metrics")
    tracker = BackgroundTracker(inner)
    tracker.log_metrics({"a": 1.0})
    tracker.end("FINISHED")  # not waited for: the run must not end as FINISHED
    assert inner.ended == ("FAILED", "RuntimeError: log_metrics failed")


def test_background_mlflow_run_nests_under_the_callers_active_run(tracking_uri, tmp_path):
    from ad.tracking import BackgroundTracker

    mlflow.set_tracking_uri(tracking_uri)
    parent = mlflow.start_run(run_name="sweep")
    tracker = BackgroundTracker(MLflowTracker(uri=tracking_uri))
    tracker.start(make_cfg(), tmp_path, "child", {})
    tracker.log_metrics({"image_AUROC": 0.9})
    child_id = tracker.run_id
    tracker.end()
    assert mlflow.active_run().info.run_id == parent.info.run_id
    mlflow.end_run()
    run = MlflowClient(tracking_uri).get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.status == "FINISHED" and run.data.metrics["image_AUROC"] == 0.9


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a Unix call")
def test_background_tracker_runs_at_the_callers_priority():
    # The run waits for this thread: lowered, it would stall the run on a busy machine (tests/test_busy_machine.py).
    import threading

    from ad.tracking import BackgroundTracker, NullTracker

    def own_priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_priority()
    tracker = BackgroundTracker(NullTracker())
    assert tracker._pool.submit(own_priority).result() == before
    assert own_priority() == before
    tracker.end()


def test_a_run_reports_its_whole_time_beside_fit_and_test(tracking_uri, tmp_path):
    # total_s counts from the command's start where the caller gives one, else from run()'s own
    import time

    from helpers import TINY, compose_config

    from ad.run import run

    cfg = compose_config(*TINY, "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4",
                         f"tracking.uri={tracking_uri}", "tracking.log_model=false", "tracking.num_images=0")
    results = run(cfg, tmp_path / "a", started=time.perf_counter() - 100.0)  # a command that began 100 s ago
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["total_s"] == results["total_s"] >= 100.0
    client = MlflowClient(tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("ad").experiment_id])
    assert logged.data.metrics["total_s"] == results["total_s"]

    again = run(cfg, tmp_path / "b")
    assert again["fit_s"] + again["test_s"] <= again["total_s"] < 100.0


def test_background_tracker_starts_the_run_when_called_not_when_the_thread_gets_to_it():
    import time

    from ad.tracking import BackgroundTracker

    inner = Recorder()
    tracker = BackgroundTracker(inner)
    before = time.time()
    tracker._pool.submit(time.sleep, 0.3)  # the thread is busy (MLflow's imports, a store being migrated)
    tracker.start(make_cfg(), Path("."), "r", {})
    tracker.end()
    assert before <= inner.calls[0][2] < before + 0.2  # the caller's time, not the thread's
    given = BackgroundTracker(inner := Recorder())
    given.start(make_cfg(), Path("."), "r", {}, start_time=123.0)  # e.g. when the command began
    given.end()
    assert inner.calls[0][2] == 123.0


def test_duration_covers_the_job_from_its_start_time(tracking_uri, tmp_path):
    import time

    began = time.time() - 5.0  # a job that began 5 s before its store answered
    tracker = MLflowTracker(uri=tracking_uri)
    tracker.start(make_cfg(), tmp_path, "r", {}, start_time=began)
    run_id = tracker.run_id
    tracker.end()
    info = MlflowClient(tracking_uri).get_run(run_id).info
    assert info.start_time == int(began * 1000)
    assert 5000 <= info.end_time - info.start_time < 60_000


def test_no_process_wide_mlflow_run_is_opened(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    assert mlflow.active_run() is None  # runs go through a client bound to the store, not MLflow's run stack
    tags = MlflowClient(tracking_uri).get_run(tracker.run_id).data.tags
    tracker.end()
    assert tags["mlflow.runName"] == "padim-bottle" and "mlflow.user" in tags and "mlflow.source.name" in tags


def test_resolved_values_are_logged_beside_the_requested_ones(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    tracker.log_resolved({"n_features": 100, "weights": "random", "precision": "bf16", "device": "cpu"})
    run_id = tracker.run_id
    tracker.end()
    params = MlflowClient(tracking_uri).get_run(run_id).data.params
    assert params["model.n_features"] == "100"  # as requested (make_cfg asks for 100)
    assert {k: v for k, v in params.items() if k.startswith("resolved.")} == {
        "resolved.n_features": "100", "resolved.weights": "random", "resolved.precision": "bf16",
        "resolved.device": "cpu"}


def test_a_resumed_run_keeps_its_first_resolved_values(tracking_uri, tmp_path):
    first = started(tracking_uri, tmp_path)
    first.log_resolved({"device": "cpu"})
    run_id = first.run_id
    first.end("KILLED", error="stopped")
    again = MLflowTracker(uri=tracking_uri)
    again.start(make_cfg(), tmp_path, "r", {}, resume_run_id=run_id)
    again.log_resolved({"device": "cuda", "precision": "bf16"})  # MLflow forbids changing a param
    again.end()
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.params["resolved.device"] == "cpu" and run.data.params["resolved.precision"] == "bf16"
    assert run.data.tags["ad.resumed"] == "true"


@pytest.mark.parametrize(("parts", "name"), [
    (("padim", "resnet18", "brick"), "padim-resnet18-brick"),
    (("ganomaly", "none", "bottle"), "ganomaly-bottle"),  # no backbone to name
    (("padim", "vit_base.augreg", "01"), "padim-vit_base_augreg-01"),  # MLflow refuses '.', '/', ':'
])
def test_logged_model_name(parts, name):
    from ad.tracking import logged_model_name

    assert logged_model_name(*parts) == name


def test_the_model_is_named_after_method_backbone_and_category(tracking_uri, tmp_path):
    tracker = MLflowTracker(uri=tracking_uri)
    tracker.start(make_cfg(), tmp_path, "r", {"ad.model": "padim", "ad.backbone": "resnet18", "ad.category": "brick"})
    bundle = fake_bundle(tmp_path / "model")
    tracker.log_model(bundle)
    tracker.log_model(bundle, name="explicit")
    run_id = tracker.run_id
    tracker.end()
    client = MlflowClient(tracking_uri)
    outputs = client.get_run(run_id).outputs.model_outputs
    assert sorted(client.get_logged_model(o.model_id).name for o in outputs) == ["explicit", "padim-resnet18-brick"]


def test_log_model_auto_logs_a_single_run_and_skips_sweep_jobs(monkeypatch):
    import ad.sweep
    from ad.tracking.mlflow_tracker import wants_model

    assert MLflowTracker(log_model="auto").save_model is True
    assert wants_model(True) is True and wants_model("false") is False
    monkeypatch.setattr(ad.sweep, "in_multirun", lambda: True)
    assert MLflowTracker(log_model="auto").save_model is False
    assert MLflowTracker(log_model=True).save_model is True
    with pytest.raises(ADError, match="tracking.log_model: 'sometimes' is not one of true, false, auto"):
        MLflowTracker(log_model="sometimes")


def test_the_experiment_opens_on_model_training_with_the_metric_columns(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    client.create_experiment("made-elsewhere")  # an experiment ad did not create gets the tags too
    for name in ("ad", "made-elsewhere"):
        tracker = MLflowTracker(uri=tracking_uri, experiment=name, columns=["image_AUROC", "total_s"])
        tracker.start(make_cfg(), tmp_path, "r", {})
        tracker.end()
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        view = json.loads(tags["mlflow.sharedViewState.ad-metrics"])
        assert view["selectedColumns"] == ["metrics.`image_AUROC`", "metrics.`total_s`", "attributes.`Models`"]


def test_links_name_the_run_and_the_experiment_view(tracking_uri, tmp_path):
    tracker = started(tracking_uri, tmp_path)
    run_id = tracker.run_id
    tracker.end()
    links = tracker.links()
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    assert links["run_id"] == run_id
    assert links["run_url"] == (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
                                "?workflowType=machine_learning")
    assert links["experiment_url"] == (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
                                       "?workflowType=machine_learning&viewStateShareKey=ad-metrics")
    assert links["open_command"] == "mlflow ui"  # the store is ./mlflow.db, mlflow ui's default
    assert NullTracker().links() == {}


def test_open_command_and_address_follow_the_store():
    from ad.tracking import experiment_url, open_command

    assert open_command("sqlite:////data/runs/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db"
    assert open_command("http://tracker:5000") == ""
    assert experiment_url("http://tracker:5000/", "7").startswith("http://tracker:5000/#/experiments/7/runs?")


def test_a_run_logs_its_image_curves(tracking_uri, tmp_path):
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("path,score,label,target,defect\na.png,0.1,0,0,good\nb.png,0.9,1,1,crack\n"
                           "c.png,0.4,0,0,good\nd.png,0.6,1,1,hole\n")
    tracker = started(tracking_uri, tmp_path)
    tracker.log_curves(predictions, 0.5)
    run_id = tracker.run_id
    tracker.end()
    names = [f.path for f in MlflowClient(tracking_uri).list_artifacts(run_id, "curves")]
    assert names == ["curves/image_curves.svg"]
