"""The interface every method implements: fit on good images, then score images."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ad.backbone import FeatureExtractor


@dataclass
class Prediction:
    """Per-image anomaly scores (B,) and, for methods that localise, anomaly maps (B, H, W)."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None


class AnomalyModel(nn.Module):
    """Base class: ``fit`` learns normality from batches of good images, ``forward`` scores a batch.

    Batches are the dicts produced by ``ad.data`` (``image`` is a normalised (B, 3, H, W) tensor).
    A method's scores must not depend on which other images share its batch.
    """

    #: False for classification-only methods (no maps: pixel metrics are skipped, never faked).
    produces_maps: bool = True

    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def resolved_settings(self) -> dict:
        """Settings the method chose itself from what was asked (PaDiM's feature count for null), for the record."""
        return {}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a fitted model's tensors into a freshly built one (strict): buffers take their fitted shapes.

        A method keeps everything scoring needs in parameters and buffers, so its constructor's
        settings plus this state rebuild it exactly; that is what the model bundle stores.
        """
        buffers = dict(self.named_buffers())
        for key, value in state.items():
            if key in buffers and buffers[key].shape != value.shape:
                owner, _, name = key.rpartition(".")
                module = self.get_submodule(owner) if owner else self
                setattr(module, name, torch.empty_like(value, device=buffers[key].device))
        self.load_state_dict(state, strict=True)

    @property
    def weights_source(self) -> str:
        """Where the backbone weights came from (imagenet, file, random), or 'none' without a backbone."""
        sources = sorted({m.weights_source for m in self.modules() if isinstance(m, FeatureExtractor)})
        return "+".join(sources) if sources else "none"


class TrainableModel(AnomalyModel):
    """A method learned by gradient descent; ``ad.trainer.Trainer`` runs its epochs.

    A subclass says how to compute its losses (``training_step``) and which optimisers to use
    (``configure_optimizers``); the trainer owns the loop, devices, mixed precision, checkpoints,
    resumption and logging, so each method file holds only the method. Methods with several
    optimisers (GANomaly) or several updates per batch (CFlow) override ``optimization_step``.
    """

    #: Epochs when ``trainer.max_epochs`` is null: the count anomalib's example config uses.
    default_epochs: int = 1

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimisers, each over the parameters it updates (frozen backbones excluded)."""
        raise NotImplementedError

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses for one training batch; ``loss`` is the one the default update minimises."""
        raise NotImplementedError

    def optimization_step(self, batch: dict, optimizers: list[torch.optim.Optimizer], step) -> dict[str, float]:
        """One update on one batch: by default minimise ``training_step(batch)['loss']`` with the first optimiser.

        ``step(loss, optimizer)`` is the trainer's update: it checks the loss is finite, zeroes the
        gradients, back-propagates (with gradient scaling under fp16) and steps the optimiser.
        Returns the losses as floats for the progress bar and the per-epoch log.
        """
        losses = self.training_step(batch)
        step(losses["loss"], optimizers[0])
        return {name: float(value.detach()) for name, value in losses.items()}

    @torch.no_grad()
    def on_train_end(self, batches: Iterable[dict], device: torch.device) -> None:
        """Called once after the last epoch, in eval mode, with the training batches.

        For statistics of the trained model over the training set that scoring needs (CFlow records
        its per-layer maximum log-likelihood here, so a score never depends on its test batch).
        Default: nothing.
        """

    def fit(self, batches, device: torch.device) -> None:
        raise TypeError(f"{type(self).__name__} is trained by ad.trainer.Trainer, not fit() in one pass")
