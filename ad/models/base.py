"""The contract every method implements: fit on good images, then score images.

A method is one file in ``ad/models/`` (a subclass of ``AnomalyModel``, or of ``TrainableModel``
when it learns by gradient descent) plus one YAML in ``conf/model/`` whose ``_target_`` names it.

Constructor
    The YAML's keys are the constructor's keyword arguments (Hydra resolves them; a bad value
    raises ``ad.errors.ADError`` naming its ``model.<key>``). A method that runs a frozen backbone
    sets ``uses_backbone = True`` (the default) and takes ``backbone: ad.backbone.BackboneSpec``,
    which the run builds from the ``backbone`` config group and ``trainer.precision`` /
    ``trainer.channels_last``; it builds its extractor with ``FeatureExtractor.from_spec(backbone,
    layers)``. A method without one (GANomaly) sets ``uses_backbone = False`` and takes no
    ``backbone`` argument at all.

Fitting
    ``AnomalyModel.fit(batches, device)`` sees the training batches once (dicts from ``ad.data``:
    ``image`` is a (B, 3, S, S) float tensor). A ``TrainableModel`` instead gives
    ``configure_optimizers`` and ``training_step`` (``optimization_step`` and ``on_train_end`` when
    it needs more), and ``ad.trainer.Trainer`` runs the epochs.

Scoring
    ``forward(images) -> Prediction``: images are (B, 3, S, S) float32, RGB, resized to
    ``dataset.image_size`` and normalised with the ImageNet mean and std (``input_range =
    "imagenet"``), possibly in channels-last memory layout. ``Prediction.scores`` is (B,),
    higher = more anomalous; ``Prediction.maps`` is (B, S, S) on the input's grid, or None when
    ``produces_maps`` is False (pixel metrics are then skipped, never faked). A method that wants
    another pixel range declares it in ``input_range`` and converts in one named method
    (``input_transform``) that training and scoring both call.

Batch invariance
    An image's score and map must not depend on the other images of its batch: the same image
    scored alone or among others gives the same numbers (to float rounding). Statistics scoring
    needs come from the training images (``fit``, ``on_train_end``), never from the test batch.

State
    Everything scoring needs lives in parameters and buffers, so the constructor's settings plus
    ``state_dict()`` rebuild the fitted model: that is what the model bundle stores
    (``ad.bundle``; ``load_fitted_state`` loads it, buffers taking their fitted shapes). A model may
    be deep-copied or pickled; helpers that cannot be (a faiss index, a cache) are dropped in
    ``__getstate__`` and rebuilt on use. ``resolved_settings()`` reports settings the method chose
    itself (PaDiM's feature count for null), for the record.

Caching
    The run calls ``use_cache(cache)`` once; by default every ``FeatureExtractor`` then serves its
    features through ``ad.backbone.CachedFeatures``. A method that caches more (PatchCore's coreset
    and searches) overrides ``use_cache`` and keeps the cache it is given; it reads no cache set
    from outside.

``tests/test_contract.py`` holds a complete method written from this docstring alone (the distance
of each feature to the mean training feature) and runs it through ``ad.run.run``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ad.backbone import FeatureExtractor
from ad.cache import DiskCache


@dataclass
class Prediction:
    """Per-image anomaly scores (B,) and, for methods that localise, anomaly maps (B, H, W)."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None


class AnomalyModel(nn.Module):
    """Base class: ``fit`` learns normality from good images, ``forward`` scores a batch (see the module docstring)."""

    #: False for classification-only methods (no maps: pixel metrics are skipped, never faked).
    produces_maps: bool = True
    #: True when the constructor takes ``backbone: BackboneSpec``; False for methods that learn from pixels.
    uses_backbone: bool = True
    #: The pixels ``forward`` and training receive: ImageNet-normalised, as ``ad.data`` makes them.
    input_range: str = "imagenet"

    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def use_cache(self, cache: DiskCache | None) -> None:
        """Serve backbone features from ``cache`` (None: compute every time); the run calls it once."""
        for extractor in (m for m in self.modules() if isinstance(m, FeatureExtractor)):
            extractor.use_cache(cache)

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
