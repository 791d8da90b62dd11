"""GANomaly: an encoder-decoder-encoder GAN whose latent gap scores anomalies (Akçay et al., ACCV 2018).

The generator encodes an image to z, decodes it to x̂ and encodes x̂ again to ẑ; a discriminator
(the encoder's architecture with one sigmoid output) plays against it. Trained on good images only,
the generator reconstructs them well, so ``mean((z - ẑ)²)`` is large for defects. The architecture,
losses (adversarial MSE between the discriminator's outputs on x and x̂ ×1, L1 reconstruction ×50,
smooth-L1 latent ×1), optimisers and "generator step, then discriminator step" schedule follow
anomalib 2.7, with two fixes:

* the DCGAN initialisation (conv weights ~ N(0, 0.02), batch-norm weights ~ N(1, 0.02)) actually
  runs: anomalib calls it on the top-level modules, where it matches nothing;
* the discriminator is re-initialised when its loss falls below 1e-5, as the paper's code and
  anomalib before 1.0 do (anomalib 2.7 dropped it); ``model.reinit_discriminator_below: null``
  turns it off.

The encoders always end in the final 4×4 convolution that makes z (anomalib's
``add_final_conv_layer=False`` crashes, and the generator has no latent vector without it).
The networks see ImageNet-normalised pixels as anomalib feeds them (``input_range: imagenet``),
although the decoder ends in Tanh and so cannot reproduce pixels outside [-1, 1]; ``input_range:
tanh`` declares that they want [-1, 1], as the paper's code does, and ``input_transform`` maps the
run's ImageNet-normalised images there for training and scoring alike. Classification only: there are no maps, so pixel
metrics are absent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ad.data import IMAGENET_MEAN, IMAGENET_STD
from ad.errors import ADError
from ad.models.base import Prediction, TrainableModel

#: Smallest padded side the pyramid works for: 32 px -> 4×4 before the final 4×4 convolution.
MIN_SIDE = 32


def next_power_of_two(size: int) -> int:
    return 1 << max(0, math.ceil(math.log2(size)))


def pad_to_power_of_two(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad (B, C, H, W) to a square power-of-two side, centred as anomalib's ``pad_nextpow2``."""
    height, width = images.shape[-2:]
    side = next_power_of_two(max(height, width))
    pad_h, pad_w = side - height, side - width
    return F.pad(images, [math.ceil(pad_w / 2), pad_w // 2, math.ceil(pad_h / 2), pad_h // 2])


def encoder_layers(side: int, latent: int, n_features: int, extra_layers: int) -> list[nn.Module]:
    """DCGAN encoder: strided 4×4 convolutions doubling the channels down to 4×4, then a 4×4 conv to ``latent``."""
    layers: list[nn.Module] = [nn.Conv2d(3, n_features, 4, 2, 4, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    for _ in range(extra_layers):
        layers += [nn.Conv2d(n_features, n_features, 3, 1, 1, bias=False), nn.BatchNorm2d(n_features),
                   nn.LeakyReLU(0.2, inplace=True)]
    size = side // 2
    while size > 4:
        layers += [nn.Conv2d(n_features, 2 * n_features, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * n_features),
                   nn.LeakyReLU(0.2, inplace=True)]
        n_features, size = 2 * n_features, size // 2
    return [*layers, nn.Conv2d(n_features, latent, 4, 1, 0, bias=False)]


def decoder_layers(side: int, latent: int, n_features: int, extra_layers: int) -> list[nn.Module]:
    """DCGAN decoder: a 4×4 transposed conv from the latent, then strided ones halving the channels, then Tanh."""
    channels = n_features * 2 ** (math.ceil(math.log2(side // 2)) - 2)
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, channels, 4, 1, 0, bias=False), nn.BatchNorm2d(channels),
                               nn.ReLU(inplace=True)]
    size = side // 2
    while size > 4:
        layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                   nn.ReLU(inplace=True)]
        channels, size = channels // 2, size // 2
    for _ in range(extra_layers):
        layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                   nn.LeakyReLU(0.2, inplace=True)]
    return [*layers, nn.ConvTranspose2d(channels, 3, 4, 2, 1, bias=False), nn.Tanh()]


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation of one module; use with ``Module.apply`` so it reaches every layer."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Encoder -> decoder -> encoder: returns the reconstruction x̂, z and ẑ."""

    def __init__(self, side: int, latent: int, n_features: int, extra_layers: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*encoder_layers(side, latent, n_features, extra_layers))
        self.decoder = nn.Sequential(*decoder_layers(side, latent, n_features, extra_layers))
        self.reencoder = nn.Sequential(*encoder_layers(side, latent, n_features, extra_layers))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent = self.encoder(images)
        reconstruction = self.decoder(latent)
        return reconstruction, latent, self.reencoder(reconstruction)


class Discriminator(nn.Module):
    """The encoder with a single output: the logit of the probability that the image is real.

    Logits rather than anomalib's sigmoid outputs so the loss can use the fused, autocast-safe
    ``binary_cross_entropy_with_logits`` (plain BCE refuses to run under CUDA autocast).
    """

    def __init__(self, side: int, n_features: int, extra_layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*encoder_layers(side, 1, n_features, extra_layers))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).flatten()


class Ganomaly(TrainableModel):
    """GANomaly anomaly detector (see module docstring)."""

    produces_maps = False
    uses_backbone = False
    #: anomalib's example config trains GANomaly for 100 epochs.
    default_epochs = 100

    def __init__(
        self,
        image_size: int,
        n_features: int = 64,
        latent_vec_size: int = 100,
        extra_layers: int = 0,
        wadv: float = 1.0,
        wcon: float = 50.0,
        wenc: float = 1.0,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        input_range: str = "imagenet",
        reinit_discriminator_below: float | None = 1e-5,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)  # NHWC networks: faster training steps on CPU
        side = next_power_of_two(int(image_size))
        if side < MIN_SIDE:
            raise ADError(f"dataset.image_size: GANomaly needs images of at least {MIN_SIDE // 2 + 1} px "
                          f"(padded to {MIN_SIDE}); got {image_size}")
        for key, value in (("n_features", n_features), ("latent_vec_size", latent_vec_size)):
            if int(value) < 1:
                raise ADError(f"model.{key}: {value} must be at least 1")
        if int(extra_layers) < 0:
            raise ADError(f"model.extra_layers: {extra_layers} must be 0 or more")
        if input_range not in ("imagenet", "tanh"):
            raise ADError(f"model.input_range: '{input_range}' is not one of imagenet, tanh")
        for key, value in (("lr", lr), ("wcon", wcon)):
            if not value > 0:
                raise ADError(f"model.{key}: {value} must be positive")
        self.image_size, self.side, self.input_range = int(image_size), side, input_range
        self.loss_weights = {"adversarial": wadv, "contextual": wcon, "latent": wenc}
        self.lr, self.betas, self.reinit_below = lr, (beta1, beta2), reinit_discriminator_below
        self.generator = Generator(side, latent_vec_size, n_features, extra_layers)
        self.discriminator = Discriminator(side, n_features, extra_layers)
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)
        if self.channels_last:
            self.generator.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        #: How often the discriminator was re-initialised (kept with the weights, for the record).
        self.register_buffer("discriminator_resets", torch.zeros((), dtype=torch.long))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam for the generator, then Adam for the discriminator (both lr 2e-4, betas (0.5, 0.999))."""
        return [torch.optim.Adam(module.parameters(), lr=self.lr, betas=self.betas)
                for module in (self.generator, self.discriminator)]

    def input_transform(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> the declared ``input_range`` (``tanh``: [-1, 1]; ``imagenet``: as given)."""
        if self.input_range == "tanh":
            return (images * self.std + self.mean) * 2 - 1
        return images

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check the size, bring the pixels to ``input_range`` and pad: the networks' input in training and scoring."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ADError(f"dataset.image_size: GANomaly was built for {self.image_size} px images, "
                          f"got {tuple(images.shape[-2:])}; build it with the same image size")
        images = pad_to_power_of_two(self.input_transform(images))
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Generator losses on one batch; also returns the tensors the discriminator step reuses."""
        images = self.prepare(batch["image"].to(self.mean.device, non_blocking=True))
        reconstruction, latent, relatent = self.generator(images)
        real = self.discriminator(images)
        fake = self.discriminator(reconstruction)
        # anomalib: MSE between the discriminator's probabilities (the paper matches features instead).
        adversarial = F.mse_loss(fake.sigmoid(), real.detach().sigmoid())
        contextual = F.l1_loss(reconstruction, images)
        latent_loss = F.smooth_l1_loss(relatent, latent)
        w = self.loss_weights
        loss = w["adversarial"] * adversarial + w["contextual"] * contextual + w["latent"] * latent_loss
        return {"loss": loss, "adversarial": adversarial, "contextual": contextual, "latent": latent_loss,
                "real": real, "reconstruction": reconstruction}

    def optimization_step(self, batch: dict, optimizers: list[torch.optim.Optimizer], step) -> dict[str, float]:
        """A generator step, then a discriminator step on the same batch and the same reconstructions."""
        generator_opt, discriminator_opt = optimizers
        outputs = self.training_step(batch)
        step(outputs["loss"], generator_opt)
        fake = self.discriminator(outputs["reconstruction"].detach())
        real = outputs["real"]
        discriminator_loss = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                                    + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        step(discriminator_loss, discriminator_opt)
        losses = {name: float(outputs[name].detach()) for name in ("loss", "adversarial", "contextual", "latent")}
        losses["discriminator"] = float(discriminator_loss.detach())
        if self.reinit_below is not None and losses["discriminator"] < self.reinit_below:
            self.discriminator.apply(dcgan_init)  # it has won; restart it so the generator keeps learning
            self.discriminator_resets += 1
        return losses

    def forward(self, images: torch.Tensor) -> Prediction:
        _, latent, relatent = self.generator(self.prepare(images))
        return Prediction(scores=(latent - relatent).square().flatten(1).mean(1))
