"""GANomaly: anomalib's networks and losses, an initialisation that runs, scores that ignore the batch."""

import pytest
import torch
from helpers import TINY, compose_config

from ad.data import IMAGENET_MEAN, IMAGENET_STD
from ad.errors import ADError
from ad.models.ganomaly import Ganomaly, pad_to_power_of_two
from ad.run import build

SMALL = {"n_features": 8, "latent_vec_size": 16}


def adam_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """The trainer's update, reduced to its core."""
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.fixture(scope="module")
def images():
    return torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_networks_have_anomalibs_shapes():
    model = Ganomaly(image_size=64)
    x = torch.randn(2, 3, 64, 64)
    reconstruction, latent, relatent = model.generator(x)
    assert reconstruction.shape == x.shape and latent.shape == relatent.shape == (2, 100, 1, 1)
    assert model.discriminator(x).shape == (2,)
    convs = [m for m in model.generator.encoder if isinstance(m, torch.nn.Conv2d)]
    # 64 px: 3->64 (k4 s2 p4), 64->128->256->512 (k4 s2 p1), 512->100 (k4)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64), (64, 128), (128, 256), (256, 512), (512, 100)]
    assert convs[0].padding == (4, 4) and isinstance(model.generator.decoder[-1], torch.nn.Tanh)
    assert model.produces_maps is False and model.weights_source == "none" and Ganomaly.default_epochs == 100


def test_inputs_are_padded_to_the_next_power_of_two_as_anomalib():
    x = torch.ones(1, 3, 45, 40)
    padded = pad_to_power_of_two(x)
    assert padded.shape == (1, 3, 64, 64)
    rows, cols = padded[0, 0].sum(1).nonzero().flatten(), padded[0, 0].sum(0).nonzero().flatten()
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (10, 54, 12, 51)  # ceil of the margin first
    model = Ganomaly(image_size=48, **SMALL)
    assert model.side == 64 and model.generator(model.prepare(torch.randn(1, 3, 48, 48)))[0].shape[-1] == 64


def test_dcgan_initialisation_ran_on_every_layer():
    model = Ganomaly(image_size=64)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and module.weight.numel() > 5000:
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.1)
            assert abs(module.weight.mean().item()) < 0.002
        if isinstance(module, torch.nn.BatchNorm2d):  # PyTorch's default would be exactly 1
            assert 0 < module.weight.std().item() < 0.04 and module.weight.mean().item() == pytest.approx(1, abs=0.02)
            assert torch.all(module.bias == 0)


def test_generator_loss_is_anomalibs_weighted_sum(images):
    torch.manual_seed(0)
    model = Ganomaly(image_size=64, **SMALL)
    losses = model.training_step({"image": images[:4]})
    expected = 1 * losses["adversarial"] + 50 * losses["contextual"] + 1 * losses["latent"]
    torch.testing.assert_close(losses["loss"], expected)
    x = images[:4]
    torch.testing.assert_close(losses["contextual"], (losses["reconstruction"] - x).abs().mean())
    with torch.no_grad():  # adversarial: MSE between the discriminator's probabilities on x and x̂, as anomalib
        real, fake = model.discriminator(x).sigmoid(), model.discriminator(losses["reconstruction"]).sigmoid()
    torch.testing.assert_close(losses["adversarial"], (real - fake).square().mean())


def test_generator_then_discriminator_steps_reduce_the_loss(images):
    torch.manual_seed(0)
    model = Ganomaly(image_size=64, **SMALL)
    optimizers = model.configure_optimizers()
    order = []

    def recording_step(loss, optimizer):
        order.append(optimizers.index(optimizer))
        adam_step(loss, optimizer)

    batch = {"image": images[:8]}
    first = model.optimization_step(batch, optimizers, recording_step)
    assert order == [0, 1]
    assert set(first) == {"loss", "adversarial", "contextual", "latent", "discriminator"}
    for _ in range(8):
        last = model.optimization_step(batch, optimizers, adam_step)
    assert last["contextual"] < first["contextual"] and last["latent"] < first["latent"]
    assert optimizers[0].defaults["lr"] == 2e-4 and optimizers[0].defaults["betas"] == (0.5, 0.999)


def test_discriminator_is_reinitialised_when_it_wins(images):
    torch.manual_seed(0)
    batch = {"image": images[:2]}
    never = Ganomaly(image_size=64, reinit_discriminator_below=None, **SMALL)
    never.optimization_step(batch, never.configure_optimizers(), adam_step)
    assert never.discriminator_resets == 0
    always = Ganomaly(image_size=64, reinit_discriminator_below=1e9, **SMALL)
    always.optimization_step(batch, always.configure_optimizers(), adam_step)
    assert always.discriminator_resets == 1
    batchnorm = next(m for m in always.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.all(batchnorm.bias == 0)  # an Adam step moved it; the re-initialisation put it back


def test_score_is_the_latent_gap_and_ignores_the_batch(images):
    torch.manual_seed(0)
    model = Ganomaly(image_size=64, **SMALL)
    model.optimization_step({"image": images[:8]}, model.configure_optimizers(), adam_step)
    model.eval()
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i:i + 1]).scores for i in range(len(images))])
        _, latent, relatent = model.generator(images)
    assert together.maps is None and together.scores.shape == (32,)
    torch.testing.assert_close(together.scores, (latent - relatent).square().mean((1, 2, 3)))
    torch.testing.assert_close(alone, together.scores, rtol=1e-5, atol=1e-6)


def test_tanh_input_range_maps_pixels_to_minus_one_one():
    model = Ganomaly(image_size=32, input_range="tanh", **SMALL)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    black, white = (0 - mean) / std, (1 - mean) / std
    x = torch.cat([black.expand(1, 3, 32, 32), white.expand(1, 3, 32, 32)])
    prepared = model.prepare(x)
    torch.testing.assert_close(prepared[0], torch.full((3, 32, 32), -1.0))
    torch.testing.assert_close(prepared[1], torch.full((3, 32, 32), 1.0))


def test_config_composes_with_anomalibs_settings():
    cfg = compose_config("model=ganomaly", "dataset.image_size=64")
    assert cfg.model.image_size == 64 and (cfg.model.n_features, cfg.model.latent_vec_size) == (64, 100)
    assert (cfg.model.wadv, cfg.model.wcon, cfg.model.wenc, cfg.model.lr) == (1, 50, 1, 2e-4)


@pytest.mark.parametrize(("setting", "key"), [
    ("dataset.image_size=16", "dataset.image_size"),
    ("model.input_range=zero_one", "model.input_range"),
    ("model.n_features=0", "model.n_features"),
    ("+model.add_final_conv=false", "model.add_final_conv"),  # always on: the only working choice
])
def test_bad_settings_name_their_key(setting, key):
    cfg = compose_config("model=ganomaly", *TINY, setting)
    with pytest.raises(ADError, match=key):
        build(cfg.model, "model", _convert_="all")


def test_images_of_another_size_are_refused():
    model = Ganomaly(image_size=64, **SMALL).eval()
    with pytest.raises(ADError, match="dataset.image_size"):
        model(torch.randn(1, 3, 32, 32))


def test_a_run_reports_image_metrics_only(tmp_path):
    from ad.run import run

    cfg = compose_config("model=ganomaly", *TINY, "dataset.n_train=8", "dataset.n_test_good=4",
                         "dataset.n_test_defect=4", "trainer.max_epochs=2", "model.n_features=8",
                         "model.latent_vec_size=16", "tracking=none")
    results = run(cfg, tmp_path)
    assert results["model"] == "ganomaly" and results["epochs"] == 2 and results["weights"] == "none"
    assert results["backbone"] == "none" and results["weights_tag"] is None
    assert "image_AUROC" in results and "image_F1" in results
    assert "pixel_AUROC" not in results and "pixel_AUPRO" not in results
