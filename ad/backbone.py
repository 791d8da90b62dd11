"""Frozen timm CNN feature extractor: its typed settings, numerics (precision from CPU facts) and caching.

Its weights come from ``ad.weights``, which records where they came from (``weights_source``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ad.cache import DiskCache, digest
from ad.errors import ADError
from ad.weights import build_feature_model, layer_indices  # noqa: F401 - layer_indices: part of this API

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen backbone a method runs on and how: the one constructor input methods with a backbone take.

    ``weights`` is ``imagenet`` (timm's weights under the pinned ``tag``), ``random`` or a checkpoint
    path; ``precision`` is the resolved autocast (``fp32``, ``bf16``, ``fp16``; ``auto`` decides per
    device); ``channels_last`` runs the backbone (and a method's own networks) in NHWC.
    """

    name: str
    weights: str = "imagenet"
    tag: str | None = "tv_in1k"
    precision: str = "fp32"
    channels_last: bool = True

    @classmethod
    def from_config(cls, backbone, precision: str = "fp32", channels_last: bool = True) -> BackboneSpec:
        """The spec of a ``backbone`` config node (name, weights, tag) run at ``precision`` and layout."""
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(backbone, resolve=True) if OmegaConf.is_config(backbone) else dict(backbone)
        return cls.of({**node, "precision": precision, "channels_last": bool(channels_last)})

    @classmethod
    def of(cls, value: BackboneSpec | Mapping) -> BackboneSpec:
        """``value`` itself, or the spec its keys describe (a bundle's record, a dict); unknown keys are refused."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping) or "name" not in value:
            raise ADError(f"backbone: expected a BackboneSpec or a mapping with a name, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ADError(f"backbone.{unknown[0]}: unknown backbone setting; use name, weights, tag, precision, "
                          "channels_last")
        return cls(**value)

    def to_dict(self) -> dict:
        """The spec as plain JSON-able values (what a model bundle records)."""
        return asdict(self)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the backbone pass: ``auto`` picks bf16 only where the hardware runs it faster.

    Decided from facts about the device, never from a timing, so the same command on the same
    machine always runs with the same numerics, however busy the machine is.
    """
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision != "auto":
        raise ADError(f"trainer.precision: '{precision}' is not one of auto, fp32, bf16, fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_is_fast() else None


def native_cpu_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX512_BF16 or AMX); without them bf16 is ~8x slower."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_identity(cpuinfo: str | None = None) -> tuple[str, frozenset[str]]:
    """The CPU's vendor and feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "", frozenset()
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


@functools.cache
def cpu_bf16_is_fast(cpuinfo: str | None = None) -> bool:
    """Whether bf16 autocast runs a CNN faster than fp32 on this CPU, from what the CPU is.

    Native bf16 kernels alone do not say: with the same torch a ResNet ran 2.6x faster in bf16 on a
    Zen 4 EPYC (AVX512_BF16), about 5x on a Xeon with AMX tiles, and 1.2x slower on a Xeon with
    AVX512_BF16 but no AMX. So: AMX, or an AMD CPU with AVX512_BF16. (A timed probe chose
    differently on a busy machine from run to run, and with it the run's numerics.)
    """
    if not native_cpu_bf16():
        return False
    vendor, flags = cpu_identity(cpuinfo)
    return "amx_bf16" in flags or (vendor == "AuthenticAMD" and "avx512_bf16" in flags)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold frozen batch-norm layers into the preceding convolutions (about 10% faster on CPU).

    Uses torch.fx; a backbone that cannot be traced is returned unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception as exc:  # noqa: BLE001 - tracing limits vary by architecture; fusion is optional
        log.debug("batch-norm fusion skipped: %s", exc)
        return model


class FeatureExtractor(nn.Module):
    """Frozen backbone returning fp32 feature maps of the requested layers.

    Runs in eval mode without gradients; ``channels_last`` and autocast (bf16/fp16) make the
    backbone pass several times faster where the hardware supports them.
    """

    def __init__(
        self,
        name: str,
        layers: list[str],
        weights: str = "imagenet",
        tag: str | None = "tv_in1k",
        precision: str = "fp32",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.name, self.layers, self.tag = name, list(layers), tag
        model, self.weights_source = build_feature_model(name, self.layers, weights, tag)
        model.eval().requires_grad_(False)
        self.channels = list(model.feature_info.channels())
        self.reductions = list(model.feature_info.reduction())
        self.model = fuse_batchnorm(model)
        self.precision, self.channels_last = precision, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._cached: CachedFeatures | None = None  # set by use_cache; never pickled or deep-copied
        self._identity: str | None = None

    @classmethod
    def from_spec(cls, spec: BackboneSpec, layers: list[str]) -> FeatureExtractor:
        """The extractor a method builds from its ``BackboneSpec``: the spec's backbone, these layers."""
        return cls(layers=list(layers), **spec.to_dict())

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cached": None, "_identity": None}

    def use_cache(self, cache: DiskCache | None) -> None:
        """Serve features through ``CachedFeatures`` over ``cache`` (None: compute every time)."""
        self._cached = None if cache is None else CachedFeatures(self, cache)

    @property
    def cache(self) -> DiskCache | None:
        """The feature cache ``use_cache`` gave, or None."""
        return None if self._cached is None else self._cached.cache

    def identity(self) -> str:
        """Hash of everything that determines the features besides the input: weights, layers, numerics."""
        if self._identity is None:
            parts = [self.name, ",".join(self.layers), self.precision, str(self.channels_last), torch.__version__]
            for key, tensor in self.model.state_dict().items():
                parts += [key, tensor.detach().cpu().contiguous().numpy().tobytes()]
            self._identity = digest(*parts)
        return self._identity

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: the backbone is frozen, its batch-norm statistics must not move."""
        return super().train(False)

    def forward(self, images: torch.Tensor, fp32: bool = True) -> list[torch.Tensor]:
        """Feature maps of the requested layers; served from the feature cache when one is in use.

        ``fp32`` (the default) gives contiguous fp32 maps. ``fp32=False`` gives them as the backbone
        computed them (bf16 under bf16 autocast, any memory layout), for callers that keep only a
        few channels or positions and convert just those.
        """
        features = self.compute(images) if self._cached is None else self._cached(images)
        return [f.float().contiguous() for f in features] if fp32 else features

    @torch.no_grad()
    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the backbone (channels_last, autocast as configured): maps in the dtype and layout it made."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = resolve_precision(self.precision, images.device)
        amp = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with amp:
            return list(self.model(images))


class CachedFeatures:
    """An extractor's ``compute`` behind a disk cache: per image, keyed on its exact pixels, only misses computed.

    Entries hold the features in the dtype the backbone computed them in (bf16 under bf16
    autocast): half the bytes to write and read, and the same fp32 values once converted.
    """

    def __init__(self, extractor: FeatureExtractor, cache: DiskCache) -> None:
        self.extractor, self.cache = extractor, cache

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        from ad.ops.cached import cached_per_item

        keys = pixel_digests(images, "features", self.extractor.identity())
        return cached_per_item(self.cache, "features", keys, images, self.extractor.compute)


def pixel_digests(images: torch.Tensor, *parts: str) -> list[str]:
    """One cache key per image: ``digest(*parts, its exact fp32 pixels)``, in one fixed layout (NHWC).

    NHWC because the loaders batch images channels-last: keying them needs no reordering copy.
    """
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1).contiguous()
    return [digest(*parts, memoryview(image.numpy()).cast("B")) for image in pixels]
