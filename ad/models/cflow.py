"""CFlow: conditional normalising flows over frozen CNN features (Gudovskiy et al., WACV 2022).

A frozen encoder (wide_resnet50_2, layer2-4) gives feature vectors ("fibers"); per layer, a
conditional normalising flow maps each fiber, conditioned on a 2-D sinusoidal encoding of its
position, to a standard normal. Training maximises the per-dimension log-likelihood through
``-logsigmoid`` with one Adam step per shuffled batch of 64 fibers, as anomalib does. At test time
each layer's likelihood ``exp(log p - max)`` is upsampled (bilinear, align_corners) to the image
and summed over layers; the anomaly map is ``layers - sum`` and the image score its maximum.

Deliberate difference from anomalib: anomalib takes ``max`` over the *test batch* (anomalib issue
#169), so an image's score depends on the images it is batched with. Here ``max`` is the largest
log-likelihood of each layer over the training fibers, recorded once after training
(``on_train_end``), and ``layers - sum`` uses the constant number of layers: every score is the
same alone or in any batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ad.backbone import BackboneSpec, FeatureExtractor
from ad.errors import ADError
from ad.models.base import Prediction, TrainableModel
from ad.threads import map_on_cores, single_threaded

#: log of the standard normal density's constant, per dimension.
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, H, W) sin/cos position code: the first half encodes x, the second y (anomalib's layout)."""
    half = channels // 2
    frequencies = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # (half / 2,)
    angle_x = torch.arange(float(width))[None, :] * frequencies[:, None]  # (half / 2, W)
    angle_y = torch.arange(float(height))[None, :] * frequencies[:, None]  # (half / 2, H)
    code = torch.empty(channels, height, width)
    code[0:half:2] = angle_x.sin()[:, None, :]
    code[1:half:2] = angle_x.cos()[:, None, :]
    code[half::2] = angle_y.sin()[:, :, None]
    code[half + 1::2] = angle_y.cos()[:, :, None]
    return code


class CouplingBlock(nn.Module):
    """FrEIA's ``AllInOneBlock`` as CFlow configures it, forward direction only.

    Conditional affine coupling with soft clamping ``clamp·tanh``, a learned per-channel global
    affine (softplus-activated scale, initially 1) and a fixed random hard permutation. Written here
    rather than taken from FrEIA (0.2, its only release, 2022): FrEIA applies the hard permutation
    as a dense C×C matrix product, which for layer4's 2048 channels costs as much as the coupling
    itself; a gather is exact and free. Scoring needs only the forward direction.
    """

    def __init__(self, channels: int, condition: int, clamp: float) -> None:
        super().__init__()
        self.active = channels - channels // 2  # fed to the subnet, passed through unchanged
        self.passive = channels // 2  # scaled and shifted by the subnet's output
        hidden = 2 * (self.active + condition)
        self.subnet = nn.Sequential(
            nn.Linear(self.active + condition, hidden), nn.ReLU(), nn.Linear(hidden, 2 * self.passive)
        )
        self.clamp = clamp
        # softplus init such that 0.1 · softplus_{β=0.5}(global_scale) = 1, as FrEIA's global_affine_init=1
        self.global_scale = nn.Parameter(torch.full((channels,), 2 * math.log(math.exp(5.0) - 1)))
        self.global_offset = nn.Parameter(torch.zeros(channels))
        self.register_buffer("permutation", torch.randperm(channels))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) fibers and (N, P) conditions -> transformed fibers and log|det J| per fiber (N,)."""
        active, passive = x.split([self.active, self.passive], dim=1)
        coefficients = 0.1 * self.subnet(torch.cat([active, condition], dim=1))
        log_scale = self.clamp * torch.tanh(coefficients[:, :self.passive])
        passive = passive * log_scale.exp() + coefficients[:, self.passive:]
        scale = 0.1 * F.softplus(self.global_scale, beta=0.5)
        y = torch.addcmul(self.global_offset, torch.cat([active, passive], dim=1), scale)
        return y[:, self.permutation], log_scale.sum(1) + scale.log().sum()


class ConditionalFlow(nn.Module):
    """A chain of coupling blocks; returns each fiber's log-likelihood per dimension under the flow."""

    def __init__(self, channels: int, condition: int, blocks: int, clamp: float) -> None:
        super().__init__()
        self.channels = channels
        self.blocks = nn.ModuleList(CouplingBlock(channels, condition, clamp) for _ in range(blocks))

    def forward(self, fibers: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        z, log_det = fibers, 0.0
        for block in self.blocks:
            z, block_log_det = block(z, condition)
            log_det = log_det + block_log_det
        log_p = -LOG_SQRT_2PI * self.channels - 0.5 * z.float().square().sum(1) + log_det
        return log_p / self.channels


class Cflow(TrainableModel):
    """CFlow anomaly detector (see module docstring)."""

    #: anomalib's example config trains CFlow for 50 epochs.
    default_epochs = 50

    def __init__(
        self,
        backbone: BackboneSpec,
        layers: tuple[str, ...] = ("layer2", "layer3", "layer4"),
        fiber_batch_size: int = 64,
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        lr: float = 1e-4,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        if condition_vector <= 0 or condition_vector % 4:
            raise ADError(f"model.condition_vector: {condition_vector} must be a positive multiple of 4 "
                          "(sin and cos of x and y); the paper uses 128")
        for key, value in (("fiber_batch_size", fiber_batch_size), ("coupling_blocks", coupling_blocks)):
            if int(value) < 1:
                raise ADError(f"model.{key}: {value} must be at least 1")
        for key, value in (("clamp_alpha", clamp_alpha), ("lr", lr)):
            if not value > 0:
                raise ADError(f"model.{key}: {value} must be positive")
        self.extractor = FeatureExtractor.from_spec(backbone, list(layers))
        self.fiber_batch_size, self.condition_vector, self.lr = int(fiber_batch_size), condition_vector, lr
        self.decoders = nn.ModuleList(
            ConditionalFlow(channels, condition_vector, coupling_blocks, clamp_alpha)
            for channels in self.extractor.channels
        )
        #: Per layer, the largest log-likelihood over the training fibers (set by ``on_train_end``).
        self.register_buffer("train_max_log_p", torch.full((len(self.decoders),), float("nan")))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam per layer's flow: equal to anomalib's single Adam over all flows, whose step only
        touches the flow that has gradients, but each step here reads one flow's state, not all."""
        return [torch.optim.Adam(decoder.parameters(), lr=self.lr, fused=True) for decoder in self.decoders]

    def fibers(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per layer: the (B·H·W, C) feature fibers, the (H·W, P) position code of the grid cells, and (H, W)."""
        out = []
        for feature in self.extractor(images):
            _, channels, height, width = feature.shape
            code = positional_encoding_2d(self.condition_vector, height, width).to(feature.device)
            out.append((feature.permute(0, 2, 3, 1).reshape(-1, channels), code.flatten(1).T, (height, width)))
        return out

    @staticmethod
    def conditions(code: torch.Tensor, index: torch.Tensor | None, count: int) -> torch.Tensor:
        """Position codes of the fibers at ``index`` of ``count`` (all of them, in order, when None)."""
        cells = code.shape[0]
        if index is None:
            return code.repeat(count // cells, 1)
        return code[index % cells]

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss over every fiber of the batch without updating (for evaluation; training uses fiber batches)."""
        losses = []
        for decoder, (fibers, code, _) in zip(self.decoders, self.fibers(self._images(batch)), strict=True):
            losses.append(-F.logsigmoid(decoder(fibers, self.conditions(code, None, len(fibers)))))
        return {"loss": torch.cat(losses).mean()}

    def optimization_step(self, batch: dict, optimizers: list[torch.optim.Optimizer], step) -> dict[str, float]:
        """Per layer, shuffle the fibers and take one Adam step per fiber batch (anomalib's schedule).

        As anomalib, a layer with E fibers gets ``E // fiber_batch_size`` steps, the last one taking
        the remainder; a layer with fewer fibers than one batch (a small last batch) gets one step.
        Each op runs on one CPU thread: with 64 rows per matrix product, OpenMP's fork/join costs
        more than it saves, and many times more on shared cores. On the CPU the layers' flows, which
        share nothing, train side by side instead, one per core (1.4-2x an epoch on 2 cores; the
        shuffles are drawn first, in layer order, so the result is the same as one after another).
        The flows run in fp32 whatever ``trainer.precision`` says, as anomalib trains them: under
        bf16 autocast their likelihoods lose too much (4 epochs on the benchmark data: pixel AUROC
        0.60 against 0.84 in fp32), and 64-row products gain little from it.
        """
        features = self.fibers(self._images(batch))
        orders = [torch.randperm(len(fibers), device=fibers.device) for fibers, _, _ in features]

        def train_layer(i: int) -> torch.Tensor:
            (fibers, code, _), decoder, optimizer = features[i], self.decoders[i], optimizers[i]
            count = len(fibers)
            steps = max(1, count // self.fiber_batch_size)
            sizes = [self.fiber_batch_size] * (steps - 1) + [count - self.fiber_batch_size * (steps - 1)]
            total = fibers.new_zeros(())
            with torch.autocast(fibers.device.type, enabled=False):
                for index in orders[i].split(sizes):
                    loss = -F.logsigmoid(decoder(fibers[index], self.conditions(code, index, count)))
                    step(loss.mean(), optimizer)
                    total += loss.detach().sum()
            return total / count

        device = features[0][0].device
        workers = min(len(features), torch.get_num_threads()) if device.type == "cpu" else 1
        by_size = sorted(range(len(features)), key=lambda i: -features[i][0].numel())  # the pool finishes together
        with single_threaded(device):
            done = dict(zip(by_size, map_on_cores(train_layer, by_size, workers, name="cflow-layer"), strict=True))
        totals = [done[i] for i in range(len(features))]
        losses = {f"loss_{layer}": float(total) for layer, total in zip(self.extractor.layers, totals, strict=True)}
        return {"loss": sum(losses.values()) / len(losses), **losses}

    @torch.no_grad()
    def on_train_end(self, batches: Iterable[dict], device: torch.device) -> None:
        """Record each layer's largest log-likelihood over the training fibers under the trained flows."""
        best = torch.full((len(self.decoders),), -math.inf, device=device)
        for batch in batches:
            for i, log_p in enumerate(self.log_likelihoods(batch["image"].to(device))):
                best[i] = torch.maximum(best[i], log_p.max())
        self.train_max_log_p = best.to(self.train_max_log_p.device)

    def log_likelihoods(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the (B, H, W) log-likelihood per dimension of every fiber (all fibers in one pass)."""
        return [
            decoder(fibers, self.conditions(code, None, len(fibers))).reshape(len(images), *grid)
            for decoder, (fibers, code, grid) in zip(self.decoders, self.fibers(images), strict=True)
        ]

    def _images(self, batch: dict) -> torch.Tensor:
        return batch["image"].to(self.train_max_log_p.device, non_blocking=True)

    def forward(self, images: torch.Tensor) -> Prediction:
        if torch.isnan(self.train_max_log_p).any():
            raise RuntimeError("Cflow.forward called before on_train_end recorded the training likelihoods")
        likelihood = 0.0
        for log_p, top in zip(self.log_likelihoods(images), self.train_max_log_p, strict=True):
            layer = torch.exp(log_p - top).unsqueeze(1)
            likelihood = likelihood + F.interpolate(layer, size=images.shape[-2:], mode="bilinear", align_corners=True)
        maps = len(self.decoders) - likelihood[:, 0]
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)
