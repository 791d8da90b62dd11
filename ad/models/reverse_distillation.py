"""Reverse Distillation: a student decoder rebuilds the teacher's features (Deng & Li, CVPR 2022).

The frozen pretrained encoder's layer1-3 features are fused by the one-class bottleneck embedding
(OCBE: layer1 and layer2 strided down to layer3's grid, concatenated with layer3, then a ResNet
stage) into one compact code; a decoder mirroring the encoder (transposed-convolution ResNet
blocks) rebuilds the three feature maps from it. Training minimises ``1 − cos`` between each
encoder map and its reconstruction, flattened per image. At test time the per-position ``1 − cos``
maps are upsampled (bilinear, corners aligned), added or multiplied (``anomaly_map_mode``) and
blurred (σ = 4); the image score is the map's maximum. Architecture, loss, optimiser and defaults
follow anomalib 2.7 (which, unlike the official code, builds OCBE with base width 64 also for
wide_resnet50_2; we follow anomalib so the two agree).
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

from ad.backbone import BackboneSpec, FeatureExtractor
from ad.errors import ADError
from ad.models.base import Prediction, TrainableModel
from ad.postprocess import blur_kernel_size, max_score

LAYERS = ("layer1", "layer2", "layer3")
#: Encoder -> (encoder block, decoder blocks per stage, decoder base width), as anomalib's get_decoder.
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6), 64),
    "resnet50": ("bottleneck", (3, 4, 6), 64),
    "resnet101": ("bottleneck", (3, 4, 23), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6), 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23), 128),
}


def init_like_resnet(module: nn.Module) -> None:
    """Kaiming-normal convolutions and unit batch norms, as torchvision's ResNet (ConvTranspose2d keeps torch's)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def up_conv(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """2x upsampling by a 2x2 stride-2 transposed convolution, the decoder's mirror of a strided conv."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 stride-2 convolution, batch norm, ReLU: one OCBE downsampling step."""
    return nn.Sequential(conv3x3(in_channels, out_channels, stride=2), nn.BatchNorm2d(out_channels), nn.ReLU(True))


class DecoderBasicBlock(nn.Module):
    """torchvision's BasicBlock with the strided 3x3 convolution replaced by a 2x transposed one."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, upsample: nn.Module | None = None, width: int = 64) -> None:
        super().__init__()
        self.conv1 = up_conv(inplanes, planes) if upsample is not None else conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class DecoderBottleneck(nn.Module):
    """torchvision's Bottleneck with the strided 3x3 convolution replaced by a 2x transposed one."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, upsample: nn.Module | None = None, width: int = 64) -> None:
        super().__init__()
        inner = planes * width // 64
        self.conv1 = conv1x1(inplanes, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = up_conv(inner, inner) if upsample is not None else conv3x3(inner, inner)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = conv1x1(inner, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class Decoder(nn.Module):
    """The encoder's layer3, layer2, layer1 in reverse: three 2x-upsampling stages of decoder blocks."""

    def __init__(self, block: type[DecoderBasicBlock | DecoderBottleneck], depths: tuple[int, int, int],
                 width: int) -> None:
        super().__init__()
        inplanes = 512 * block.expansion
        stages = []
        for planes, depth in zip((256, 128, 64), depths, strict=True):
            out = planes * block.expansion
            upsample = nn.Sequential(up_conv(inplanes, out), nn.BatchNorm2d(out))
            blocks = [block(inplanes, planes, upsample, width)] + [block(out, planes, None, width)
                                                                    for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = out
        self.layer1, self.layer2, self.layer3 = stages
        init_like_resnet(self)

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions of the encoder's [layer1, layer2, layer3] maps."""
        a = self.layer1(code)
        b = self.layer2(a)
        return [self.layer3(b), b, a]


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale fusion of layer1-3 into a compact code one stage deeper than layer3."""

    def __init__(self, block: type[BasicBlock | Bottleneck], depth: int) -> None:
        super().__init__()
        e = block.expansion
        fused, out = 3 * 256 * e, 512 * e
        downsample = nn.Sequential(conv1x1(fused, out, stride=2), nn.BatchNorm2d(out))
        self.stage = nn.Sequential(block(fused, 512, stride=2, downsample=downsample),
                                   *[block(out, 512) for _ in range(depth - 1)])
        self.layer1_down = nn.Sequential(conv_bn_relu(64 * e, 128 * e), conv_bn_relu(128 * e, 256 * e))
        self.layer2_down = conv_bn_relu(128 * e, 256 * e)
        init_like_resnet(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        fused = torch.cat([self.layer1_down(features[0]), self.layer2_down(features[1]), features[2]], dim=1)
        return self.stage(fused)


def cosine_loss(encoder: list[torch.Tensor], decoder: list[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of the batch mean of ``1 − cos`` between whole flattened maps (official RD4AD loss)."""
    return sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
               for e, d in zip(encoder, decoder, strict=True))


class ReverseDistillation(TrainableModel):
    """Reverse Distillation anomaly detector (see module docstring)."""

    default_epochs = 200  # anomalib's examples/configs/model/reverse_distillation.yaml

    def __init__(
        self,
        backbone: BackboneSpec,
        anomaly_map_mode: str = "add",
        blur_sigma: float = 4.0,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.99),
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        if anomaly_map_mode not in ("add", "multiply"):
            raise ADError(f"model.anomaly_map_mode: '{anomaly_map_mode}' is not one of add, multiply")
        name = backbone.name
        if name not in ARCHITECTURES:
            raise ADError(f"backbone.name: Reverse Distillation has decoders for {', '.join(ARCHITECTURES)}, "
                          f"not '{name}'; pick one of those")
        kind, depths, width = ARCHITECTURES[name]
        self.encoder = FeatureExtractor.from_spec(backbone, list(LAYERS))
        if kind == "basic":
            self.bottleneck, self.decoder = OneClassBottleneck(BasicBlock, 2), Decoder(DecoderBasicBlock, depths, width)
        else:
            self.bottleneck, self.decoder = OneClassBottleneck(Bottleneck, 3), Decoder(DecoderBottleneck, depths, width)
        self.channels_last = backbone.channels_last
        if self.channels_last:
            self.bottleneck.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)
        self.anomaly_map_mode, self.blur_sigma = anomaly_map_mode, float(blur_sigma)
        self.lr, self.betas = float(lr), tuple(float(b) for b in betas)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam on decoder and bottleneck, as anomalib (lr 0.005, betas (0.5, 0.99))."""
        params = [*self.decoder.parameters(), *self.bottleneck.parameters()]
        return [torch.optim.Adam(params, lr=self.lr, betas=self.betas)]

    def reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder features and the decoder's reconstructions of them."""
        encoder = self.encoder(images)
        code_input = encoder
        if self.channels_last:
            code_input = [f.contiguous(memory_format=torch.channels_last) for f in encoder]
        return encoder, self.decoder(self.bottleneck(code_input))

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cosine reconstruction loss summed over the three layers."""
        return {"loss": cosine_loss(*self.reconstruct(batch["image"]))}

    def forward(self, images: torch.Tensor) -> Prediction:
        """Per-layer ``1 − cos`` maps upsampled, combined, blurred; score = map maximum."""
        size = images.shape[-2:]
        encoder, decoder = self.reconstruct(images)
        maps = None
        for e, d in zip(encoder, decoder, strict=True):
            distance = (1 - F.cosine_similarity(e, d.float(), dim=1)).unsqueeze(1)
            distance = F.interpolate(distance, size=size, mode="bilinear", align_corners=True)
            if maps is None:
                maps = distance
            else:
                maps = maps + distance if self.anomaly_map_mode == "add" else maps * distance
        if self.blur_sigma > 0:
            k = blur_kernel_size(self.blur_sigma)
            maps = kornia.filters.gaussian_blur2d(maps, (k, k), (self.blur_sigma, self.blur_sigma),
                                                  border_type="reflect")
        maps = maps.squeeze(1)
        return Prediction(scores=max_score(maps), maps=maps)
