"""Bad input found before a run starts: one line naming the key or file, exit 2, no MLflow run.

The config is checked right after composing (``ad.validate.check_config``), the dataset is listed
and checked before the tracker opens a run (``check_dataset``), and both say what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, compose_config
from mlflow import MlflowClient

from ad.data import make_mvtec_layout
from ad.data.io import list_images
from ad.errors import ADError, ConfigError
from ad.validate import check_config

TINY_SYNTHETIC = ["dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6"]


def launch(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m ad.launch`` in ``cwd``, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ad.launch", *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def runs_in(uri: str) -> list:
    """Every MLflow run of the store (an absent store has none)."""
    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def last_line(result: subprocess.CompletedProcess) -> str:
    """The last line the command printed (stdout and stderr together, stderr last as a terminal shows it)."""
    return (result.stdout + result.stderr).strip().splitlines()[-1]


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset=folder"], "dataset.normal_dir: must be set"),
    (["trainer.batch_size=abc"], "trainer.batch_size: must be a whole number ≥ 1, got 'abc'"),
    (["trainer.batch_size=0"], "trainer.batch_size: must be a whole number ≥ 1, got 0"),
    (["trainer.batch_size=-1"], "trainer.batch_size: must be a whole number ≥ 1, got -1"),
    (["trainer.batch_size=1.5"], "trainer.batch_size: must be a whole number ≥ 1, got 1.5"),
    (["model.n_features=abc"], "model.n_features: must be a whole number ≥ 1 (or null), got 'abc'"),
    (["trainer.precision=fp8"], "trainer.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
    (["model=patchcore", "model.coreset_ratio=0"], "model.coreset_ratio: must be a number in (0, 1], got 0"),
    (["model=ganomaly", "model.wcon=heavy"], "model.wcon: must be a number, got 'heavy'"),  # type of its default
    (["model=stfpm", "model.layers=layer1"], "model.layers: must be a list, got 'layer1'"),
    (["runtime.threads=0"], "runtime.threads: must be a whole number ≥ 1 (or null), got 0"),
    (["runtime.prefetch_niceness=20"], "runtime.prefetch_niceness: must be a whole number in [0, 19], got 20"),
    (["runtime.cache_max_gb=0"], "runtime.cache_max_gb: must be a number > 0, got 0"),
    (["runtime.keep_freed_memory=maybe"], "runtime.keep_freed_memory: must be true or false, got 'maybe'"),
])
def test_a_bad_value_is_a_config_error_naming_its_key(overrides, message):
    cfg = compose_config(*overrides)
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "padim")
    with pytest.raises(ConfigError) as error:
        check_config(cfg, model)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides", [
    [], ["model=ganomaly", "model.wcon=0.5"], ["model=dfm", "model.pca_level=1"], ["trainer.max_epochs=null"],
    ["dataset=btad", "dataset.category=1"], ["model=ganomaly", "model.reinit_discriminator_below=null"],
    ["runtime.threads=2", "runtime.cache_dir=/tmp/ad-cache", "runtime.prefetch_niceness=0"],
])
def test_valid_values_pass(overrides):
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "padim")
    check_config(compose_config(*overrides), model)


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset=folder"], "error: dataset.normal_dir: must be set"),
    (["trainer.batch_size=abc"], "error: trainer.batch_size: must be a whole number"),
    (["trainer.batch_size=-1"], "error: trainer.batch_size: must be a whole number ≥ 1, got -1"),
    (["model.n_features=abc"], "error: model.n_features: must be a whole number"),
    (["dataset=folder", "dataset.normal_dir=/data/é"],
     "error: dataset.normal_dir=/data/é: Hydra cannot read this unquoted value"),
])
def test_the_command_exits_2_with_one_line_before_anything_runs(tmp_path, tracking_uri, overrides, message):
    result = launch(tmp_path, *overrides, f"tracking.uri={tracking_uri}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_line(result).startswith(message) and result.stderr.strip().count("\n") == 0
    assert not runs_in(tracking_uri) and not (tmp_path / "run").exists()


def test_a_non_ascii_path_quoted_as_the_error_says_is_read(tmp_path):
    result = launch(tmp_path, "dataset=folder", "dataset.normal_dir='/data/é'", "--cfg", "job")
    assert result.returncode == 0 and "normal_dir: /data/é" in result.stdout


def test_an_unknown_category_suggests_the_close_one_and_starts_no_run(tmp_path, tracking_uri):
    result = launch(tmp_path, "dataset.category=brik", f"tracking.uri={tracking_uri}", *TINY,
                    f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert last_line(result) == ("error: dataset.category: 'brik' is not a category of synthetic; did you mean "
                                 "'brick'? valid: brick, grass, gravel, tissue")
    assert not runs_in(tracking_uri)


def test_a_failed_run_prints_its_error_last_without_tracking(tmp_path):
    result = launch(tmp_path, "dataset.category=brik", "tracking=none", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and last_line(result).startswith("error: dataset.category: 'brik'")


@pytest.fixture(scope="module")
def widget(tmp_path_factory) -> Path:
    """A tiny MVTec-layout category whose folders the folder dataset reads."""
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_layout(root, "widget", n_train=6, n_test_good=3, n_test_defect=3, image_size=32, seed=0)
    return root / "widget"


def test_a_dangling_symlink_among_the_images_is_named(widget, tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    for image in (widget / "train" / "good").iterdir():
        (folder / image.name).symlink_to(image)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ADError, match=r"gone\.png: broken symbolic link .*nowhere\.png"):
        list_images(folder)


def test_an_unreadable_folder_is_named(tmp_path, monkeypatch):
    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)  # running as root, chmod would not stop the listing
    with pytest.raises(ADError, match=rf"{tmp_path}: cannot list the folder \(Permission denied\); make it readable"):
        list_images(tmp_path)
