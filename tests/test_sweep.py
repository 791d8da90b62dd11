"""Sweeps: every job runs and is tracked even when some fail; typos are caught before anything runs.

The default suite runs one real sweep (the benchmark recipe on two categories, one of them bad);
the joblib, submitit (with a real MLflow server) and Optuna sweeps are marked slow: pytest -m slow.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import TINY
from mlflow import MlflowClient

from ad.errors import ADError
from ad.launch import expand_all_categories
from ad.sweep import SWEEP_TAG, summarize

ROOT = Path(__file__).resolve().parents[1]
QUICK = [*TINY, "dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6", "tracking.log_model=false",
         "tracking.num_images=0"]


def command(tmp_path: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=600)


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return command(tmp_path, [sys.executable, "-m", "ad.launch", *overrides])


def runs_by_category(uri: str, experiment: str = "ad") -> dict:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.data.tags["ad.category"]: r for r in runs}


def assert_survived(result: subprocess.CompletedProcess, runs: dict, good: list[str], bad: str) -> None:
    """The bad job failed alone: recorded FAILED with its error, the others finished, exit 1 with a summary."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{len(good)} of {len(good) + 1} jobs finished, 1 failed" in result.stderr
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("  job ")]
    assert len(failed_lines) == 1 and f"dataset.category={bad}] FAILED: dataset.category:" in failed_lines[0]
    assert sorted(runs) == sorted([*good, bad])
    assert runs[bad].info.status == "FAILED" and "dataset.category" in runs[bad].data.tags["error"]
    assert all(runs[c].info.status == "FINISHED" for c in good)
    assert len({r.data.tags[SWEEP_TAG] for r in runs.values()}) == 1  # one sweep id groups them


def test_benchmark_recipe_survives_a_failing_job_and_reports_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = command(tmp_path, ["bash", str(ROOT / "launch" / "benchmark.sh"), "synthetic", "padim", *QUICK,
                                f"tracking.uri={uri}"], PYTHON=sys.executable, CATEGORIES="brick,nope")
    runs = runs_by_category(uri, "benchmark-synthetic")
    assert_survived(result, runs, ["brick"], "nope")
    sweep_dir = Path(runs["brick"].data.tags["ad.sweep_dir"])
    assert sweep_dir.parent == tmp_path / "outputs" / "multirun"
    assert runs["brick"].data.tags[SWEEP_TAG] == sweep_dir.name
    table = (tmp_path / "outputs" / "reports" / "benchmark-synthetic.md").read_text()
    assert "### synthetic · padim · resnet18 (weights: random)" in table and "| brick | 0." in table
    assert "| nope |  |  |  |  |" in table and "nope: FAILED" in table
    assert table in result.stdout  # printed too


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.categroy=brick,grass"], "'dataset.categroy' does not exist; did you mean 'dataset.category'?"),
    (["model=padim,padm"], "model=padm: no such option"),
    (["model=padim,patchcore", "model.coreset_ratio=0.1"], "'model.coreset_ratio' does not exist"),
    (["model.n_features=int(interval(16,64))"], "add hydra/sweeper=optuna"),
    (["hydra/launcher=joblib", "trainer.batch_sise=2,4"], "'trainer.batch_sise' does not exist"),
])
def test_sweep_typos_exit_2_with_one_line_before_any_job(tmp_path, overrides, message):
    result = launch(tmp_path, "-m", *overrides, f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.strip().count("\n") == 0
    assert message in result.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_group_dependent_typo_names_the_jobs_it_concerns(tmp_path):
    result = launch(tmp_path, "-m", "model=padim,patchcore,dfm", "model.coreset_ratio=0.1")
    assert result.returncode == 2 and "(in the jobs with model=padim; model=dfm)" in result.stderr


def test_all_categories_expands_to_the_dataset_list():
    args = ["-m", "dataset=synthetic", "++dataset.categories=[brick,'01']", "dataset.category=all", "seed=1,2"]
    assert expand_all_categories(args) == [*args[:3], "dataset.category=brick,'01'", "seed=1,2"]


@pytest.mark.parametrize(("args", "message"), [
    (["dataset.category=all"], "add -m"),
    (["-m", "dataset=synthetic,mvtec", "dataset.category=all"], "run one sweep per dataset"),
    (["-m", "++dataset.categories=[]", "dataset.category=all"], "dataset=synthetic has no dataset.categories"),
])
def test_all_categories_errors_say_what_to_do(args, message):
    with pytest.raises(ADError, match=message):
        expand_all_categories(args)


def test_a_job_without_result_counts_as_failed(tmp_path):
    for num, result in enumerate(["metrics.json", None]):
        job = tmp_path / f"{num}_padim"
        (job / ".hydra").mkdir(parents=True)
        hydra = {"hydra": {"overrides": {"task": [f"dataset.category=c{num}", "seed=1"]}, "job": {"num": num}}}
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        if result:
            (job / result).write_text("{}")
    text, failures = summarize(tmp_path)
    assert failures == 1 and text.splitlines()[1].startswith("  job 1 [dataset.category=c1] NO RESULT: ")


def test_a_sweep_rerun_into_the_same_folder_reports_each_job_as_it_ended_this_time(tmp_path):
    sweep = [*(o for o in QUICK if not o.startswith("tracking.")), "tracking=none",
             f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir=${hydra.job.num}"]
    first = launch(tmp_path, "-m", *sweep, "dataset.category=brick,nope")
    assert first.returncode == 1 and "job 1 [dataset.category=nope] FAILED" in first.stderr
    second = launch(tmp_path, "-m", *sweep, "dataset.category=brick,grass")  # job 1's folder held a failure
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 of 2 jobs finished" in second.stdout


@pytest.mark.slow
def test_joblib_jobs_share_a_new_sqlite_store(tmp_path):
    """Two parallel processes create the default store at once: the file lock lets one migrate it."""
    result = launch(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *QUICK,
                    "dataset.category=brick,nope,grass")
    assert result.returncode == 1, result.stderr[-3000:]  # before reading the store: say why if it is missing
    assert_survived(result, runs_by_category(f"sqlite:///{tmp_path}/mlflow.db"), ["brick", "grass"], "nope")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free loopback port, stopped after the test."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.read() == b"OK":
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_submitit_jobs_log_to_one_mlflow_server(tmp_path, mlflow_server):
    result = launch(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *QUICK,
                    "tracking.num_images=1", f"tracking.uri={mlflow_server}", "dataset.category=brick,nope")
    runs = runs_by_category(mlflow_server)
    assert_survived(result, runs, ["brick"], "nope")
    client = MlflowClient(mlflow_server)
    artifacts = {a.path for a in client.list_artifacts(runs["brick"].info.run_id)}
    assert {"metrics.json", "anomaly_maps", "hydra"} <= artifacts  # artifacts went through the server
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_optuna_search_goes_on_past_a_failed_trial(tmp_path):
    # Not the grid sampler: with hydra-optuna-sweeper 1.3.0 a failed *last* grid trial makes Optuna 2.10
    # raise "Study.stop is supposed to be invoked inside an objective function" and the search ends.
    result = launch(tmp_path, "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.n_jobs=1",
                    "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize",
                    "model.n_features=choice(32,9999)", *QUICK,
                    f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    assert result.returncode == 1 and "model.n_features: 9999 is outside" in result.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"model.n_features": 32} and 0 <= best["best_value"] <= 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ad").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED", "FINISHED"} and len(runs) == 3


APP = '''
import hydra
from ad.sweep import run_name

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    print("NAME", run_name("padim-synthetic-" + str(cfg.dataset.category)))

main()
'''


def test_run_names_carry_the_settings_a_sweep_varies(tmp_path):
    # A real Hydra multirun: the job reads which settings vary from the multirun.yaml Hydra saves first.
    (tmp_path / "app.py").write_text(APP)
    sweep = ["+model.n_features=50,100", "+dataset.category=brick,grass", "+backbone.weights=random",
             "+trainer.seed=1", "+model.seed=2,3"]
    result = command(tmp_path, [sys.executable, "app.py", "-m", *sweep, f"hydra.sweep.dir={tmp_path}/sweep"])
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(line[5:] for line in result.stdout.splitlines() if line.startswith("NAME "))
    assert len(names) == 8
    # constants (weights, trainer.seed) and the category (already in the name) are left out, and a
    # swept key is named by its last part (model.seed -> seed: the constant trainer.seed is not named)
    assert names[0] == "padim-synthetic-brick n_features=100 seed=2"
    assert "padim-synthetic-grass n_features=50 seed=3" in names

    (tmp_path / "plain.py").write_text(APP)
    single = command(tmp_path, [sys.executable, "plain.py", "+dataset.category=brick", "+model.n_features=50",
                                f"hydra.run.dir={tmp_path}/run"])
    assert single.stdout.strip() == "NAME padim-synthetic-brick"  # a single run keeps its plain name
