"""Reverse Distillation: architecture shapes, loss and maps against closed forms, batch independence, fitting."""

import pytest
import torch
import torch.nn.functional as F

from ad.backbone import BackboneSpec
from ad.errors import ADError
from ad.models.reverse_distillation import (
    ARCHITECTURES,
    BasicBlock,
    Bottleneck,
    Decoder,
    DecoderBasicBlock,
    DecoderBottleneck,
    OneClassBottleneck,
    ReverseDistillation,
    cosine_loss,
)
from ad.trainer import Trainer

BACKBONE = BackboneSpec("resnet18", weights="random")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReverseDistillation(BACKBONE).eval()


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_decoder_rebuilds_every_encoder_shape(name):
    kind, depths, width = ARCHITECTURES[name]
    e = 1 if kind == "basic" else 4
    encoder_block, decoder_block = (BasicBlock, DecoderBasicBlock) if kind == "basic" else (Bottleneck,
                                                                                            DecoderBottleneck)
    bottleneck = OneClassBottleneck(encoder_block, 2 if kind == "basic" else 3).eval()
    decoder = Decoder(decoder_block, depths, width).eval()
    features = [torch.randn(1, 64 * e, 16, 16), torch.randn(1, 128 * e, 8, 8), torch.randn(1, 256 * e, 4, 4)]
    with torch.no_grad():
        code = bottleneck(features)
        rebuilt = decoder(code)
    assert code.shape == (1, 512 * e, 2, 2)
    assert [r.shape for r in rebuilt] == [f.shape for f in features]


def test_wide_decoder_is_wider_than_the_plain_one():
    plain = Decoder(DecoderBottleneck, (3, 4, 6), 64).layer1[0].conv2
    wide = Decoder(DecoderBottleneck, (3, 4, 6), 128).layer1[0].conv2
    assert (plain.in_channels, wide.in_channels) == (256, 512)


def test_loss_is_one_minus_cosine_of_whole_maps_summed_over_layers():
    encoder = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    assert cosine_loss(encoder, [2 * e for e in encoder]).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(encoder, [-e for e in encoder]).item() == pytest.approx(4.0)  # 2 per layer
    # whole flattened maps, not per position: reversing one position only partly lowers the cosine
    flipped = [e.clone() for e in encoder]
    flipped[0][:, :, 0, 0] *= -1
    per_image = 1 - F.cosine_similarity(encoder[0].flatten(1), flipped[0].flatten(1))
    assert cosine_loss(encoder[:1], flipped[:1]).item() == pytest.approx(per_image.mean().item())


@pytest.mark.parametrize("mode", ["add", "multiply"])
def test_map_combines_upsampled_layer_distances_then_blurs(mode):
    torch.manual_seed(0)
    model = ReverseDistillation(BACKBONE, anomaly_map_mode=mode, blur_sigma=0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        encoder, decoder = model.reconstruct(images)
        prediction = model(images)
    layers = [F.interpolate((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size=(64, 64), mode="bilinear",
                            align_corners=True)[:, 0] for e, d in zip(encoder, decoder, strict=True)]
    expected = layers[0] + layers[1] + layers[2] if mode == "add" else layers[0] * layers[1] * layers[2]
    torch.testing.assert_close(prediction.maps, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(prediction.scores, prediction.maps.flatten(1).amax(1))


def test_blur_smooths_the_map(model):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        blurred = model(images).maps
        model.blur_sigma = 0.0
        raw = model(images).maps
        model.blur_sigma = 4.0
    assert blurred.shape == raw.shape == (2, 64, 64)
    assert blurred.diff(dim=-1).abs().mean() < raw.diff(dim=-1).abs().mean()


def test_scores_do_not_depend_on_the_batch(model):
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = model(images).scores
        alone = torch.cat([model(images[i:i + 1]).scores for i in range(32)])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=0)


def test_fit_trains_decoder_and_bottleneck_only(tmp_path):
    torch.manual_seed(0)
    model = ReverseDistillation(BACKBONE)
    (optimizer,) = model.configure_optimizers()
    assert optimizer.defaults["lr"] == 0.005 and optimizer.defaults["betas"] == (0.5, 0.99)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*model.decoder.parameters(), *model.bottleneck.parameters()]}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    images = [{"image": torch.randn(3, 64, 64)} for _ in range(8)]
    losses = []

    class Log:
        run_id = None

        def log_metrics(self, metrics, step=None):
            losses.append(metrics["train/loss"])

    Trainer(tmp_path, torch.device("cpu"), None, Log(), max_epochs=2, batch_size=4).fit(model, images)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    prediction = model(torch.randn(2, 3, 64, 64))
    assert prediction.maps.shape == (2, 64, 64) and prediction.scores.shape == (2,)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"anomaly_map_mode": "max"}, "model.anomaly_map_mode"),
    ({"backbone": {"name": "efficientnet_b0", "weights": "random"}}, "backbone.name"),
])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ADError, match=key):
        ReverseDistillation(**{"backbone": BACKBONE, **kwargs})
