"""The trainer: epochs, logging, checkpoints, exact resumption, divergence and Ctrl-C."""

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from ad.checkpoints import find_checkpoint, load_checkpoint
from ad.errors import ADError
from ad.models.base import Prediction, TrainableModel
from ad.postprocess import max_score
from ad.tracking import Tracker
from ad.trainer import Trainer

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyModel(TrainableModel):
    """A small conv autoencoder with batch norm (running stats) and dropout (draws from the global RNG)."""

    default_epochs = 3

    def __init__(self, lr: float = 0.05, nan_at: int | None = None, interrupt_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Conv2d(8, 3, 1))
        self.lr, self.nan_at, self.interrupt_at, self.calls = lr, nan_at, interrupt_at, 0

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)]

    def training_step(self, batch):
        self.calls += 1
        if self.interrupt_at == self.calls:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered during this step
        images = batch["image"]
        loss = (self.net(images) - images).square().mean()
        if self.nan_at == self.calls:
            loss = loss * float("nan")
        return {"loss": loss}

    def forward(self, images):
        maps = (self.net(images) - images).square().mean(1)
        return Prediction(scores=max_score(maps), maps=maps)


class Images(torch.utils.data.Dataset):
    def __init__(self, count: int = 10):
        self.images = torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": torch.tensor(0), "path": f"{i}.png"}


class Recorder(Tracker):
    """Keeps every logged metric by step."""

    run_id = "run-1"

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def train(run_dir: Path, epochs: int | None, resume: Path | None = None, init_seed: int = 0, model_class=TinyModel,
          model_kwargs: dict | None = None, evaluate=None, precision: torch.dtype | None = None,
          **kwargs) -> tuple[TrainableModel, Recorder]:
    """Seed, build a TinyModel, train it; a different ``init_seed`` proves a resume restores everything."""
    torch.manual_seed(init_seed)
    model = model_class(**(model_kwargs or {}))
    tracker = Recorder()
    trainer = Trainer(run_dir, CPU, precision, tracker, max_epochs=epochs, batch_size=4, resume_from=resume, **kwargs)
    trainer.fit(model, Images(), evaluate)
    return model, tracker


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_epochs_log_losses_and_write_checkpoints(tmp_path):
    model, tracker = train(tmp_path, None)  # null = the model's default_epochs
    assert [step for step, _ in tracker.metrics] == [1, 2, 3]
    losses = [m["train/loss"] for _, m in tracker.metrics]
    assert all(loss > 0 for loss in losses) and losses[-1] < losses[0]
    assert {"train/epoch_s", "train/lr"} <= tracker.metrics[0][1].keys()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["step"] == 0 and state["run_id"] == "run-1"
    assert state["best_epoch"] == 3 and state["best_value"] == pytest.approx(losses[-1])
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert not model.training


def test_resuming_for_more_epochs_equals_an_uninterrupted_run(tmp_path):
    straight, _ = train(tmp_path / "straight", 4)
    train(tmp_path / "killed", 2)
    resumed, tracker = train(tmp_path / "killed", 4, resume=tmp_path / "killed" / "checkpoints" / "last.pt",
                             init_seed=123)
    assert [step for step, _ in tracker.metrics] == [3, 4]
    assert_same_weights(straight, resumed)


class AutocastProbe(TinyModel):
    """Notes the CPU autocast state each training step runs under."""

    def training_step(self, batch):
        self.seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return super().training_step(batch)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_cpu_training_steps_run_under_the_requested_autocast(tmp_path, precision):
    model, tracker = train(tmp_path, 3, model_class=AutocastProbe, precision=precision)
    assert model.seen[0] is (precision is not None)
    if precision is not None:
        assert model.seen[1] == precision
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed precision: fp32 master weights
    losses = [m["train/loss"] for _, m in tracker.metrics]
    assert losses[-1] < losses[0]


def test_bf16_resume_equals_an_uninterrupted_bf16_run(tmp_path):
    straight, _ = train(tmp_path / "straight", 3, precision=torch.bfloat16)
    train(tmp_path / "killed", 1, precision=torch.bfloat16)
    resumed, _ = train(tmp_path / "killed", 3, resume=tmp_path / "killed" / "checkpoints" / "last.pt", init_seed=7,
                       precision=torch.bfloat16)
    assert_same_weights(straight, resumed)


def test_ctrl_c_mid_epoch_checkpoints_and_resume_matches(tmp_path):
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run as a background job (CI)
    straight, _ = train(tmp_path / "straight", 3)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", 3, model_kwargs={"interrupt_at": 5})  # epoch 2, step 2 of 3
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed, tracker = train(tmp_path / "run", None, resume=tmp_path / "run" / "checkpoints" / "last.pt",
                             init_seed=123)
    assert [step for step, _ in tracker.metrics] == [2, 3]  # the epoch count came from the checkpoint
    assert_same_weights(straight, resumed)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's handler restored


def test_ctrl_c_in_an_epochs_last_step_saves_even_between_checkpoint_epochs(tmp_path):
    straight, _ = train(tmp_path / "straight", 3)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", 3, model_kwargs={"interrupt_at": 6}, checkpoint_every=5,  # epoch 2, step 3 of 3
              eval_every=1, evaluate=lambda: {"image_AUROC": 0.5})  # best.pt only after epoch 1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (2, 0)
    resumed, _ = train(tmp_path / "run", None, resume=tmp_path / "run" / "checkpoints" / "last.pt", init_seed=123)
    assert_same_weights(straight, resumed)


def test_nan_loss_stops_with_where_and_what_to_try_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(ADError, match=r"loss is nan at epoch 2/3, step 2/3; lower the learning rate \(model.lr"):
        train(tmp_path, 3, model_kwargs={"nan_at": 5})
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)


def test_best_checkpoint_follows_the_monitored_metric(tmp_path):
    scores = iter([0.6, 0.9, 0.7])
    _, tracker = train(tmp_path, 3, eval_every=1, evaluate=lambda: {"image_AUROC": next(scores)})
    assert [m["eval/image_AUROC"] for _, m in tracker.metrics] == [0.6, 0.9, 0.7]
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == 2 and best["best_value"] == pytest.approx(0.9)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 3


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"max_epochs": 0}, "trainer.max_epochs"),
    ({"eval_every": -1}, "trainer.eval_every"),
    ({"monitor": "image_AUROC"}, "trainer.monitor"),
    ({"checkpoint_every": 0}, "trainer.checkpoint_every"),
])
def test_bad_settings_name_their_key(tmp_path, kwargs, key):
    with pytest.raises(ADError, match=key):
        Trainer(tmp_path, CPU, None, Recorder(), **kwargs)


def test_unknown_monitor_is_named(tmp_path):
    with pytest.raises(ADError, match="trainer.monitor: 'los'"):
        train(tmp_path, 1, monitor="los")


def test_resume_rejects_another_models_checkpoint(tmp_path):
    train(tmp_path, 1)

    class Other(TinyModel):
        pass

    with pytest.raises(ADError, match="trainer.resume: .* not of"):
        train(tmp_path, 2, model_class=Other, resume=tmp_path / "checkpoints" / "last.pt")


def test_find_checkpoint(tmp_path):
    runs = tmp_path / "outputs" / "runs"
    old, new, other = (runs / name / "checkpoints" for name in ("01_stfpm", "02_stfpm", "03_padim"))
    for folder in (old, new, other):
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"x")
    os.utime(old / "last.pt", (1, 1))
    current = runs / "04_stfpm"
    assert find_checkpoint(False, current, "stfpm", True) is None
    assert find_checkpoint(True, current, "stfpm", True) == new / "last.pt"  # newest run of this model
    assert find_checkpoint(True, old.parent, "stfpm", True) == old / "last.pt"  # its own folder first
    assert find_checkpoint(str(old.parent), current, "stfpm", True) == old / "last.pt"
    with pytest.raises(ADError, match="trainer.resume=true: no checkpoints/last.pt"):
        find_checkpoint(True, current, "stfpm", False)  # sweep jobs never pick a sibling job's checkpoint
    with pytest.raises(ADError, match="trainer.resume: '/nowhere/last.pt'"):
        find_checkpoint("/nowhere/last.pt", current, "stfpm", True)


# -- whole runs: MLflow step metrics, resuming the same MLflow run, a diverging run -------------------

RUN = ["dataset.image_size=64", "backbone.weights=random", "model=stfpm", "model.layers=[layer1,layer2]",
       "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4", "trainer.batch_size=4",
       "tracking.num_images=0"]


def history(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_run_logs_epochs_to_mlflow_and_resumes_the_same_run(tmp_path, tracking_uri):
    from helpers import compose_config
    from mlflow import MlflowClient

    from ad.run import run

    uri = tracking_uri
    first = run(compose_config(*RUN, "trainer.max_epochs=2", "trainer.eval_every=1", f"tracking.uri={uri}"),
                tmp_path / "run")
    run_id = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["run_id"]
    client = MlflowClient(uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and first["epochs"] == 2
    assert history(client, run_id, "train/loss") == [1, 2] == history(client, run_id, "eval/image_AUROC")
    assert logged.outputs.model_outputs  # the trained model

    resumed = run(compose_config(*RUN, "trainer.max_epochs=3", "trainer.eval_every=1", "trainer.resume=true",
                                 f"tracking.uri={uri}", "tracking.log_model=false"), tmp_path / "run")
    assert resumed["epochs"] == 3
    assert history(client, run_id, "train/loss") == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["ad.resumed"] == "true"
    assert len(client.search_runs([logged.info.experiment_id])) == 1

    untracked = [o for o in RUN if not o.startswith("tracking.")]
    straight = run(compose_config(*untracked, "trainer.max_epochs=3", "trainer.eval_every=1", "tracking=none"),
                   tmp_path / "straight")
    assert {k: straight[k] for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")} == {
        k: resumed[k] for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}
    weights = [load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"] for name in ("run", "straight")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_diverging_run_fails_in_mlflow_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tracking_uri):
    from helpers import compose_config
    from mlflow import MlflowClient

    from ad.models.stfpm import Stfpm
    from ad.run import run

    calls = []
    honest = Stfpm.training_step

    def diverging(self, batch):
        calls.append(1)
        losses = honest(self, batch)
        return {"loss": losses["loss"] * (float("inf") if len(calls) == 3 else 1.0)}  # epoch 2, step 1

    monkeypatch.setattr(Stfpm, "training_step", diverging)
    expected = r"loss is inf at epoch 2/3, step 1/2; lower the learning rate \(model.lr, now 0.4"
    with pytest.raises(ADError, match=expected):
        run(compose_config(*RUN, "trainer.max_epochs=3", f"tracking.uri={tracking_uri}"), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)
    failed = MlflowClient(tracking_uri).get_run(state["run_id"])
    assert failed.info.status == "FAILED" and "epoch 2/3" in failed.data.tags["error"]
    assert not (tmp_path / "run" / "metrics.json").exists()
