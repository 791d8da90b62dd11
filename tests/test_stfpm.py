"""STFPM: loss and maps against their closed forms, batch independence, and whole runs."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY

from ad.backbone import BackboneSpec
from ad.models.stfpm import Stfpm, feature_matching_loss, layer_distance

BACKBONE = BackboneSpec("resnet18", weights="random")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Stfpm(BACKBONE).eval()


def test_loss_is_half_the_squared_distance_of_normalised_features_per_position():
    teacher = torch.randn(2, 5, 3, 4)
    assert feature_matching_loss(teacher, 3 * teacher).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    # opposite unit vectors are 2 apart: 0.5 · 4 per position, summed over the batch, averaged over positions
    assert feature_matching_loss(teacher, -teacher).item() == pytest.approx(0.5 * 4 * 2)
    distance = layer_distance(teacher, -teacher)
    torch.testing.assert_close(distance, torch.full((2, 3, 4), 2.0))


def test_student_is_the_same_architecture_randomly_initialised(model):
    teacher = dict(model.teacher.model.named_parameters())
    student = dict(model.student.named_parameters())
    convolutions = [p.shape for p in student.values() if p.ndim == 4]  # the teacher's batch norms are fused
    assert convolutions == [p.shape for p in teacher.values() if p.ndim == 4]
    assert not torch.equal(student["conv1.weight"], teacher["conv1.weight"])
    assert all(p.requires_grad for p in student.values()) and not any(p.requires_grad for p in teacher.values())


def test_map_is_the_product_of_upsampled_layer_distances_and_score_its_maximum(model):
    images = torch.randn(3, 3, 64, 64)
    prediction = model(images)
    expected = torch.ones(3, 1, 64, 64)
    for t, s in zip(model.teacher(images), model.student(images), strict=True):
        d = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).norm(dim=1, keepdim=True) ** 2
        expected = expected * F.interpolate(d, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(prediction.maps, expected[:, 0], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(prediction.scores, prediction.maps.flatten(1).amax(1))


def test_scores_do_not_depend_on_the_batch(model):
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = model(images).scores
        alone = torch.cat([model(images[i:i + 1]).scores for i in range(32)])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=0)


def test_a_training_step_moves_only_the_student():
    torch.manual_seed(0)
    model = Stfpm(BACKBONE).train()
    (optimizer,) = model.configure_optimizers()
    assert optimizer.defaults["lr"] == 0.4 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["weight_decay"] == 1e-3
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in model.student.state_dict().items()}
    loss = model.training_step({"image": torch.randn(4, 3, 64, 64)})["loss"]
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items())
    assert not torch.equal(student["conv1.weight"], model.student.conv1.weight)


def test_launch_trains_scores_and_checkpoints(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "ad.launch", "model=stfpm", *TINY, "dataset.n_train=8", "dataset.n_test_good=4",
         "dataset.n_test_defect=4", "trainer.max_epochs=2", "trainer.batch_size=4", "tracking=none",
         "model.layers=[layer1,layer2]", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "stfpm" and metrics["epochs"] == 2 and metrics["backbone"] == "resnet18"
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "fit_s", "test_s"):
        assert isinstance(metrics[key], float)
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
