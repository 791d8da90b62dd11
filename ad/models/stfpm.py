"""STFPM: student-teacher feature pyramid matching (Wang et al., BMVC 2021).

A frozen pretrained teacher and a randomly initialised student of the same architecture see the
same good images; the student learns to reproduce the teacher's channel-normalised layer1-3
features. At test time the per-layer map ``0.5·‖norm(t) − norm(s)‖²`` (over channels) is
upsampled bilinearly to the image and the layers are multiplied; no blur; the image score is the
map's maximum. Loss, optimiser and defaults follow anomalib 2.7's ``Stfpm``.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from ad.backbone import BackboneSpec, FeatureExtractor, layer_indices
from ad.models.base import Prediction, TrainableModel
from ad.postprocess import max_score


def feature_matching_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``0.5/(H·W) · Σ (norm(t) − norm(s))²`` summed over batch, channels and positions (paper eq. 1)."""
    height, width = teacher.shape[-2:]
    return layer_distance(teacher, student).sum() / (height * width)


def layer_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature pair -> (B, h, w) half squared distance of the channel-normalised vectors."""
    return 0.5 * (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).square().sum(dim=1)


class Stfpm(TrainableModel):
    """STFPM anomaly detector (see module docstring)."""

    default_epochs = 100  # anomalib's examples/configs/model/stfpm.yaml

    def __init__(
        self,
        backbone: BackboneSpec,
        layers: tuple[str, ...] = ("layer1", "layer2", "layer3"),
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        self.teacher = FeatureExtractor.from_spec(backbone, list(layers))
        out_indices = layer_indices(self.teacher.name, list(layers))
        self.student = timm.create_model(self.teacher.name, pretrained=False, features_only=True,
                                         out_indices=out_indices)
        self.channels_last = backbone.channels_last
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """SGD on the student only, as anomalib (lr 0.4, momentum 0.9, weight decay 1e-3)."""
        return [torch.optim.SGD(self.student.parameters(), lr=self.lr, momentum=self.momentum, dampening=0.0,
                                weight_decay=self.weight_decay)]

    def student_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The student's feature maps of the configured layers."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.student(images)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Feature-matching loss summed over the layers."""
        images = batch["image"]
        teacher = self.teacher(images)
        student = self.student_features(images)
        return {"loss": sum(feature_matching_loss(t, s) for t, s in zip(teacher, student, strict=True))}

    def forward(self, images: torch.Tensor) -> Prediction:
        """Product over layers of the upsampled teacher-student distance maps; score = its maximum."""
        size = images.shape[-2:]
        maps = torch.ones(images.shape[0], 1, *size, device=images.device)
        for teacher, student in zip(self.teacher(images), self.student_features(images), strict=True):
            layer_map = layer_distance(teacher, student.float()).unsqueeze(1)
            maps = maps * F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False)
        maps = maps.squeeze(1)
        return Prediction(scores=max_score(maps), maps=maps)

