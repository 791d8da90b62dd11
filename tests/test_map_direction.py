"""A map that points away from the defects fails here: each trained map method, from its own seeded
initial parameters, after a few steps on tiny generated data, must reach what anomalib's model
reaches from the same parameters on the same batches.

The figures were recorded by ``benchmarks/parity.py --record`` (anomalib's model, given ad's
initial parameters; see tests/data/map_direction_anomalib.json), so the bound comes from
anomalib, not from ad. Both train in fp32; ad's model here runs at one thread, anomalib's ran on
two, so the two part by float rounding only: hence the margin.
"""

import json
from pathlib import Path

import pytest
import timm
import torch

from ad.data import Synthetic, collate
from ad.metrics import compute_metrics
from ad.models.cflow import Cflow
from ad.models.reverse_distillation import ReverseDistillation
from ad.models.stfpm import Stfpm

RECORDED = json.loads((Path(__file__).parent / "data" / "map_direction_anomalib.json").read_text())
#: How far below anomalib's figure ad may land (float rounding compounded over the steps).
MARGIN = 0.05
#: GANomaly has no map to point anywhere; the step-by-step parity harness covers it.
METHODS = {"stfpm": Stfpm, "reverse_distillation": ReverseDistillation, "cflow": Cflow}

pytestmark = pytest.mark.usefixtures("one_thread")


def build(model: str, weights: Path):
    """ad's model as benchmarks/parity.py builds it: the shared checkpoint, fp32, NCHW."""
    backbone = {"name": RECORDED["setup"]["backbone"], "weights": str(weights), "tag": None, "precision": "fp32",
                "channels_last": False}
    return METHODS[model](backbone)


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def split(dataset, name: str) -> dict:
    items = getattr(dataset, f"{name}_set")(None)
    return collate([items[i] for i in range(len(items))])


def test_every_map_method_has_a_recorded_bound():
    assert set(RECORDED["anomalib"]) == set(METHODS)


@pytest.mark.parametrize("model", sorted(METHODS))
def test_trained_method_finds_the_defects_as_anomalib_does(model, tmp_path):
    setup = {**RECORDED["setup"], **RECORDED["overrides"].get(model, {})}
    dataset = Synthetic(category=setup["category"], image_size=setup["image_size"], n_train=setup["n_train"],
                        n_test_good=setup["n_test_good"], n_test_defect=setup["n_test_defect"], seed=setup["seed"],
                        root=str(tmp_path / "data"))
    train, test = split(dataset, "train"), split(dataset, "test")
    weights = tmp_path / "backbone.pth"
    torch.manual_seed(setup["seed"])  # the random backbone, drawn as the recording drew it
    torch.save(timm.create_model(setup["backbone"], pretrained=False).state_dict(), weights)
    torch.manual_seed(setup["seed"])
    detector = build(model, weights)

    images, size = train["image"], setup["batch_size"]
    optimizers = detector.configure_optimizers()
    detector.train()
    for step in range(setup["steps"]):
        torch.manual_seed(setup["seed"] + step + 1)  # CFlow's fiber shuffles, drawn as in the recording
        detector.optimization_step({"image": images[(step * size) % len(images):][:size]}, optimizers, update)
    detector.eval()
    with torch.no_grad():
        detector.on_train_end([{"image": chunk} for chunk in images.split(size)], torch.device("cpu"))
        predictions = [detector(chunk) for chunk in test["image"].split(size)]
    scores = torch.cat([p.scores for p in predictions])
    maps = torch.cat([p.maps for p in predictions])
    pixel_auroc = compute_metrics(scores, test["label"], maps, test["mask"].bool())["pixel_AUROC"]

    expected = RECORDED["anomalib"][model]["pixel_AUROC"]
    assert expected > 0.65, f"the recorded setting does not separate defects for {model}; record another"
    assert pixel_auroc >= expected - MARGIN, f"{model}: pixel AUROC {pixel_auroc:.3f}, anomalib reached {expected:.3f}"
