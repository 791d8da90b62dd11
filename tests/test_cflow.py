"""CFlow: the flow equals anomalib's, training follows its fiber-batch schedule, scores ignore the batch."""

from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_config

from ad.backbone import BackboneSpec
from ad.errors import ADError
from ad.models.cflow import Cflow, ConditionalFlow, positional_encoding_2d
from ad.run import build

#: Made by tests/data/cflow_anomalib_reference.py.txt with anomalib 2.7 (FrEIA SequenceINN of its AllInOneBlock).
REFERENCE = Path(__file__).parent / "data" / "cflow_anomalib_reference.pt"
BACKBONE = BackboneSpec("resnet18", weights="random", precision="fp32")


def sgd_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """The trainer's update, reduced to its core."""
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def tiny_model(**settings) -> Cflow:
    torch.manual_seed(0)
    return Cflow(backbone=BACKBONE, coupling_blocks=2, condition_vector=16, **settings)


@pytest.fixture(scope="module")
def images():
    return torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(images):
    model = tiny_model()
    optimizers = model.configure_optimizers()
    for _ in range(2):
        model.optimization_step({"image": images[:8]}, optimizers, sgd_step)
    model.eval()
    model.on_train_end([{"image": images[:4]}, {"image": images[4:8]}], torch.device("cpu"))
    return model


def test_flow_matches_anomalib_and_freia():
    reference = torch.load(REFERENCE)
    flow = ConditionalFlow(channels=9, condition=8, blocks=2, clamp=1.9)
    for block, weights in zip(flow.blocks, reference["blocks"], strict=True):
        block.subnet[0].weight.data, block.subnet[0].bias.data = weights["w1"], weights["b1"]
        block.subnet[2].weight.data, block.subnet[2].bias.data = weights["w2"], weights["b2"]
        block.global_scale.data, block.global_offset.data = weights["gs"], weights["go"]
        block.permutation = weights["perm"]
    torch.testing.assert_close(flow(reference["x"], reference["c"]), reference["logp"])
    torch.testing.assert_close(positional_encoding_2d(8, 3, 5), reference["pe"])


def test_a_fresh_flow_starts_as_the_identity():
    flow = ConditionalFlow(channels=6, condition=4, blocks=3, clamp=1.9)
    for block in flow.blocks:
        torch.nn.init.zeros_(block.subnet[2].weight)
        torch.nn.init.zeros_(block.subnet[2].bias)
    x = torch.randn(5, 6)
    expected = (-0.5 * torch.log(torch.tensor(2 * torch.pi)) * 6 - 0.5 * x.square().sum(1)) / 6
    torch.testing.assert_close(flow(x, torch.randn(5, 4)), expected)


def test_fiber_batches_follow_anomalib_and_reduce_the_loss(images):
    model = tiny_model()
    optimizers = model.configure_optimizers()
    used = []

    def counting_step(loss, optimizer):
        used.append(optimizers.index(optimizer))
        sgd_step(loss, optimizer)

    batch = {"image": images[:4]}
    with torch.no_grad():
        before = model.training_step(batch)["loss"]
    losses = model.optimization_step(batch, optimizers, counting_step)
    # 64 px: layer2 8x8, layer3 4x4, layer4 2x2 cells; 4 images -> 256, 64, 16 fibers -> 4, 1, 1 steps of 64
    assert sorted(used) == [0, 0, 0, 0, 1, 2]  # per layer; the layers may interleave (they train side by side)
    assert set(losses) == {"loss", "loss_layer2", "loss_layer3", "loss_layer4"}
    for _ in range(3):
        model.optimization_step(batch, optimizers, sgd_step)
    with torch.no_grad():
        assert model.training_step(batch)["loss"] < before


def test_layers_side_by_side_train_exactly_as_one_after_another(images):
    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):  # one thread: layer after layer; two: a pool of two layer workers
            torch.set_num_threads(count)
            torch.manual_seed(0)
            model = tiny_model()
            optimizers = model.configure_optimizers()
            for _ in range(2):
                model.optimization_step({"image": images[:4]}, optimizers, sgd_step)
            weights.append(model.decoders.state_dict())
    finally:
        torch.set_num_threads(threads)
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_flows_train_in_fp32_under_mixed_precision(images):
    model = tiny_model()
    seen = []
    model.decoders[0].blocks[0].subnet[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the trainer wraps steps in for trainer.precision=bf16
        model.optimization_step({"image": images[:2]}, model.configure_optimizers(), sgd_step)
    assert seen and set(seen) == {torch.float32}


def test_encoder_stays_frozen(images):
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    model.optimization_step({"image": images[:2]}, model.configure_optimizers(), sgd_step)
    assert all(torch.equal(v, model.extractor.state_dict()[k]) for k, v in frozen.items())
    assert all(not p.requires_grad for p in model.extractor.parameters())


def test_normaliser_is_the_training_maximum(trained, images):
    with torch.no_grad():
        per_layer = [torch.cat(pair).amax() for pair in
                     zip(trained.log_likelihoods(images[:4]), trained.log_likelihoods(images[4:8]), strict=True)]
    torch.testing.assert_close(trained.train_max_log_p, torch.stack(per_layer))


def test_map_is_layers_minus_the_summed_upsampled_likelihoods(trained, images):
    with torch.no_grad():
        prediction = trained(images[:3])
        expected = 3.0
        for log_p, top in zip(trained.log_likelihoods(images[:3]), trained.train_max_log_p, strict=True):
            layer = torch.nn.functional.interpolate(
                (log_p - top).exp()[:, None], size=(64, 64), mode="bilinear", align_corners=True)
            expected = expected - layer[:, 0]
    assert prediction.maps.shape == (3, 64, 64)
    torch.testing.assert_close(prediction.maps, expected)
    torch.testing.assert_close(prediction.scores, prediction.maps.flatten(1).amax(1))
    with torch.no_grad():  # training images never exceed their own maximum: maps are >= 0 there
        assert trained(images[:8]).maps.min() >= -1e-5


def test_scores_do_not_depend_on_the_batch(trained, images):
    with torch.no_grad():
        together = trained(images)
        alone = [trained(images[i:i + 1]) for i in range(len(images))]
    torch.testing.assert_close(torch.cat([p.scores for p in alone]), together.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p.maps for p in alone]), together.maps, rtol=1e-5, atol=1e-5)


def test_scoring_before_calibration_is_an_error(images):
    with pytest.raises(RuntimeError, match="on_train_end"):
        tiny_model()(images[:1])


def test_config_composes_with_the_papers_settings():
    cfg = compose_config("model=cflow")
    assert cfg.backbone.name == "wide_resnet50_2"
    assert list(cfg.model.layers) == ["layer2", "layer3", "layer4"]
    assert (cfg.model.fiber_batch_size, cfg.model.condition_vector, cfg.model.coupling_blocks) == (64, 128, 8)
    assert cfg.model.clamp_alpha == 1.9 and cfg.model.lr == 1e-4 and Cflow.default_epochs == 50


@pytest.mark.parametrize(("setting", "key"), [
    ("model.condition_vector=30", "model.condition_vector"),
    ("model.fiber_batch_size=0", "model.fiber_batch_size"),
    ("model.coupling_blocks=0", "model.coupling_blocks"),
    ("model.clamp_alpha=0", "model.clamp_alpha"),
    ("model.layers=[layer9]", "model.layers"),
])
def test_bad_settings_name_their_key(setting, key):
    cfg = compose_config("model=cflow", "backbone=resnet18", *TINY, setting)
    with pytest.raises(ADError, match=key):
        build(cfg.model, "model", backbone=BackboneSpec.from_config(cfg.backbone), _convert_="object")


def test_command_line_trains_and_scores_end_to_end(tmp_path):
    import json
    import os
    import subprocess
    import sys

    overrides = ["model=cflow", "backbone=resnet18", *TINY, "dataset.n_train=8", "dataset.n_test_good=4",
                 "dataset.n_test_defect=4", "trainer.max_epochs=2", "model.coupling_blocks=2",
                 "model.condition_vector=16", "tracking=none", f"hydra.run.dir={tmp_path}/run"]
    result = subprocess.run([sys.executable, "-m", "ad.launch", *overrides], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == "cflow" and metrics["epochs"] == 2
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"} <= metrics.keys()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(key.startswith("decoders.") for key in state)
