"""The scoring graph of each method: a module from normalised (B, 3, S, S) images to (scores, maps or None).

Methods whose own ``forward`` traces into a static graph are exported as they are; PaDiM, PatchCore,
CFlow and DFKDE get an export forward (``ad.export.padim``, ``.patchcore``, ``.cflow``, ``.dfkde``) built
from the model's own buffers and submodules and tested equal to its ``forward``. Every backbone runs in fp32, without
the feature cache: an exported detector computes what the bundle computes in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from ad.backbone import FeatureExtractor


class FittedForward(nn.Module):
    """Base of the export forwards: keeps the fitted model, refuses an unfitted one (its graph would be empty)."""

    def __init__(self, model: nn.Module, fitted: bool) -> None:
        super().__init__()
        if not fitted:
            raise RuntimeError(f"{type(self).__name__}: the model is not fitted")
        self.model = model


class ModelForward(nn.Module):
    """A model's own ``forward``, its ``Prediction`` unpacked into the (scores, maps) a graph returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        prediction = self.model(images)
        return prediction.scores, prediction.maps


def in_fp32(model: nn.Module) -> nn.Module:
    """``model`` with every backbone set to fp32 and no feature cache (in place): what an export computes."""
    for extractor in (m for m in model.modules() if isinstance(m, FeatureExtractor)):
        extractor.precision = "fp32"
        extractor.use_cache(None)
    return model.eval()


def scorer_for(model: nn.Module) -> nn.Module:
    """The exportable scoring module of a fitted ``ad.models`` method (in fp32)."""
    from ad.export.cflow import CflowScorer
    from ad.export.dfkde import DfkdeScorer
    from ad.export.padim import PadimScorer
    from ad.export.patchcore import PatchcoreScorer
    from ad.models.cflow import Cflow
    from ad.models.dfkde import Dfkde
    from ad.models.padim import Padim
    from ad.models.patchcore import Patchcore

    model = in_fp32(model)
    for cls, scorer in ((Padim, PadimScorer), (Patchcore, PatchcoreScorer), (Cflow, CflowScorer),
                          (Dfkde, DfkdeScorer)):
        if isinstance(model, cls):
            return scorer(model)
    return ModelForward(model)
