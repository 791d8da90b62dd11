"""Frozen timm CNN feature extractor: its typed settings, numerics (precision from CPU facts) and caching.

Its weights come from ``ad.weights``, which records where they came from (``weights_source``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ad.backbone_record import BuildRecord, build_key, recall, recalled_weights, remember
from ad.cache import DiskCache, digest
from ad.errors import ADError
from ad.weights import build_feature_model, layer_indices  # noqa: F401 - layer_indices: part of this API

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen backbone a method runs on and how: the one constructor input methods with a backbone take.

    ``weights`` is ``imagenet`` (timm's weights under the pinned ``tag``), ``random`` or a checkpoint
    path; ``precision`` is the resolved autocast (``fp32``, ``bf16``, ``fp16``; ``auto`` decides per
    device); ``channels_last`` runs the backbone (and a method's own networks) in NHWC. ``records``,
    not a setting but where the run keeps its feature cache, lets an extractor recall an earlier
    identical build instead of building (``ad.backbone_record``).
    """

    name: str
    weights: str = "imagenet"
    tag: str | None = "tv_in1k"
    precision: str = "fp32"
    channels_last: bool = True
    records: DiskCache | None = field(default=None, compare=False, repr=False)

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
        unknown = sorted(set(value) - ({f.name for f in fields(cls)} - {"records"}))
        if unknown:
            raise ADError(f"backbone.{unknown[0]}: unknown backbone setting; use name, weights, tag, precision, "
                          "channels_last")
        return cls(**value)

    def to_dict(self) -> dict:
        """The settings as plain JSON-able values (what a model bundle records)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "records"}


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
    backbone pass several times faster where the hardware supports them. Given ``records`` (the
    run's feature cache), an extractor whose identical build was recorded there recalls it instead
    of building (``ad.backbone_record``): the network is then built only if a feature must be computed.
    """

    def __init__(
        self,
        name: str,
        layers: list[str],
        weights: str = "imagenet",
        tag: str | None = "tv_in1k",
        precision: str = "fp32",
        channels_last: bool = True,
        records: DiskCache | None = None,
    ) -> None:
        super().__init__()
        self.name, self.layers, self.weights, self.tag = name, list(layers), weights, tag
        self.precision, self.channels_last = precision, channels_last
        # Follows .to(): the device a backbone built later (see ``network``) goes to.
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)
        self._cached: CachedFeatures | None = None  # set by use_cache; never pickled or deep-copied
        self._identity: str | None = None
        self._record: BuildRecord | None = None  # set while the backbone is recalled, not built
        self._weights: dict[str, torch.Tensor] | None = None  # a recalled backbone's weights, once read
        self._records = records
        key = build_key(name, self.layers, weights, tag) if records is not None else None
        record = recall(records, key) if key is not None else None
        if record is not None:
            self._recall(record)
            return
        rng_before = torch.get_rng_state()
        self._build()
        fell_back = weights == "imagenet" and self.weights_source != "imagenet"  # may find them next time
        if key is not None and not fell_back:
            origin = str(Path(self._origin).resolve()) if self._origin else None
            record = BuildRecord(self.identity(), self.channels, self.reductions, self.weights_source, rng_before,
                                 torch.get_rng_state(), origin)
            remember(records, key, record, self.model.state_dict())

    def _build(self) -> None:
        """Make the timm model (frozen, batch norm folded, in the configured layout) and note its shapes."""
        model, self.weights_source, self._origin = build_feature_model(self.name, self.layers, self.weights, self.tag)
        model.eval().requires_grad_(False)
        self.channels = list(model.feature_info.channels())
        self.reductions = list(model.feature_info.reduction())
        self.model = fuse_batchnorm(model)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.to(self.device_anchor.device)

    def _recall(self, record: BuildRecord) -> None:
        """Take what a recorded build decided instead of building, and leave torch's random state as it left it."""
        self._record, self._identity, self._origin = record, record.identity, record.origin
        self.channels, self.reductions = list(record.channels), list(record.reductions)
        self.weights_source = record.weights_source
        self.model = None
        torch.set_rng_state(record.rng_after)

    def network(self) -> nn.Module:
        """The backbone network, built now if it was recalled (from the random state its record began with)."""
        if self._record is not None:
            record, self._record, self._weights = self._record, None, None
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(record.rng_before)
                self._build()
            if self.weights_identity() != record.identity:
                raise ADError(f"feature cache: the recorded build of backbone {self.name} does not match what builds "
                              f"now; delete {self._records.root if self._records else 'the feature cache'}")
        return self.model

    @classmethod
    def from_spec(cls, spec: BackboneSpec, layers: list[str]) -> FeatureExtractor:
        """The extractor a method builds from its ``BackboneSpec``: the spec's backbone, these layers."""
        return cls(layers=list(layers), records=spec.records, **spec.to_dict())

    def __getstate__(self) -> dict:
        self.network()  # a copy carries the weights, not a cache's record of them
        return {**super().__getstate__(), "_cached": None, "_identity": None, "_records": None, "_weights": None}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """A recalled backbone's state holds the weights its build made, from the cache (or built now)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._record is not None:
            if self._weights is None:  # kept: a trainer's checkpoints ask for the state every epoch
                self._weights = recalled_weights(self._records, self._record.identity)
            weights = self._weights
            if weights is None:
                self.network()  # evicted: the state dict recursion then saves the built network's weights
            else:
                destination.update({f"{prefix}model.{key}": value for key, value in weights.items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Loading backbone weights into a recalled extractor builds its network first, to load them into."""
        if self._record is not None and any(key.startswith(f"{prefix}model.") for key in state_dict):
            self.network()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            self.network()
            self._identity = self.weights_identity()
        return self._identity

    def weights_identity(self) -> str:
        """``identity`` computed from the built network (not taken from a record)."""
        parts = [self.name, ",".join(self.layers), self.precision, str(self.channels_last), torch.__version__]
        for key, tensor in self.model.state_dict().items():
            parts += [key, tensor.detach().cpu().contiguous().numpy().tobytes()]
        return digest(*parts)

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
            return list(self.network()(images))


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
