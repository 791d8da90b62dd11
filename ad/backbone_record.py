"""What building a frozen backbone decided, remembered in the feature cache, so that a warm run builds none.

A run whose images' features are all cached needs of its backbone only what the build decided: the
identity that keys those features, the channels and strides of its layers, where its weights came
from and, for the model bundle, the weights themselves. Building it is most of such a run's start-up
(importing timm pulls in torchvision and ``torch._dynamo``; then the model is made and fused), so
the first build is recorded under a key of everything that decides it: backbone, layers, weights
setting (a checkpoint by its content), torch and timm versions, and torch's random state, which
decides random weights. The random state the build leaves behind is recorded too and restored on
recall, so whatever the run draws afterwards (a student network's initial weights) is the same
whether the backbone was built or recalled.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ad.cache import DiskCache, digest
from ad.errors import ADError

RECORDS = "backbones"
WEIGHTS = "backbone-weights"


@dataclass(frozen=True)
class BuildRecord:
    """What one backbone build decided (see the module docstring)."""

    identity: str
    channels: list[int]
    reductions: list[int]
    weights_source: str
    rng_before: torch.Tensor  # torch's CPU random state the build started from
    rng_after: torch.Tensor  # ... and the one it left
    # The weights file with links resolved, checked to be still there on recall: a checkpoint is keyed by
    # its content, and a Hugging Face cache file resolves to a blob named by its content's hash.
    origin: str | None

    def to_dict(self) -> dict:
        return dict(vars(self))


def build_key(name: str, layers: list[str], weights: str, tag: str | None) -> str | None:
    """Key of a build under torch's current random state; None where it cannot be keyed (the build then says why)."""
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    parts = ["backbone-build", name, ",".join(layers), weights, str(tag), torch.__version__, timm_version]
    if weights not in ("random", "imagenet"):
        from ad.data.base import file_key

        try:
            parts.append(file_key(Path(weights).expanduser().resolve()))  # path, size, mtime, hash of the bytes
        except ADError:  # absent or unreadable: the build says why
            return None
    parts.append(memoryview(torch.get_rng_state().numpy()))
    return digest(*parts)


def recall(cache: DiskCache, key: str) -> BuildRecord | None:
    """The record stored under ``key``, or None when there is none or its weights file is gone."""
    stored = cache.load(RECORDS, key)
    if not isinstance(stored, dict):
        return None
    try:
        record = BuildRecord(**stored)
    except TypeError:  # written by another layout: a miss
        return None
    if record.origin is not None and not Path(record.origin).is_file():
        return None
    return record


def remember(cache: DiskCache, key: str, record: BuildRecord, weights: dict[str, torch.Tensor]) -> None:
    """Store ``record`` under ``key`` and the built (fused) weights under its identity, in the background."""
    if cache.writes_off:
        return
    # The weights first; a record whose weights are missing (evicted, not yet written) is still valid.
    cache.save_async(WEIGHTS, record.identity, {k: v.detach().cpu() for k, v in weights.items()})
    cache.save_async(RECORDS, key, record.to_dict())


def recalled_weights(cache: DiskCache | None, identity: str) -> dict[str, torch.Tensor] | None:
    """The weights a recorded build made, or None when they were evicted (the backbone is then built again)."""
    if cache is None:
        return None
    stored = cache.load(WEIGHTS, identity)
    return stored if isinstance(stored, dict) else None
