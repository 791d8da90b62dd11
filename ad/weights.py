"""Where a backbone's weights come from, and the proof that they fit: the ImageNet hub, a file, or random.

The weights come from one of three places and the run always says which (``weights_source``):
``imagenet`` (timm's pretrained weights under an explicitly pinned tag, from the local Hugging Face
cache or the hub), ``file`` (a local timm/torchvision state-dict checkpoint, for air-gapped
machines, loaded only if every weight fits the architecture) or ``random`` (deliberately, or after
a loud warning when ImageNet weights cannot be fetched), so nobody mistakes a random-feature result
for a real one.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Container
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ad.errors import ADError

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0

def layer_indices(name: str, layers: list[str]) -> list[int]:
    """Map timm feature module names (``layer1``...) to ``out_indices``, built on the meta device."""
    import timm  # here, not at the top: a run that recalls its backbone never imports timm (ad.backbone_record)

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ADError(f"backbone.name: unknown timm model '{name}' ({exc}); see timm.list_models()") from None
    names = probe.feature_info.module_name()
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ADError(f"model.layers: {missing} are not feature layers of {name}; choose from {names}")
    return [names.index(layer) for layer in layers]


def _host_reachable(url: str) -> bool:
    """True when a TCP connection to the URL's host opens quickly (avoids a minute of hub retries)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _cached_hub_file(hf_hub_id: str) -> str | None:
    """Path of already-downloaded hub weights, so cached weights load with no network at all."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _create(name: str, out_indices: list[int], file: str | None = None, pretrained: bool = False,
            state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The timm features-only model, loading weights from a file, a checked state dict or timm's source."""
    import timm

    overlay = {"state_dict": state_dict} if state_dict is not None else {"file": file} if file else None
    return timm.create_model(
        name, pretrained=pretrained or overlay is not None, features_only=True, out_indices=out_indices,
        pretrained_cfg_overlay=overlay,
    )


#: Prefixes a wrapper puts on every key of a saved state dict: DDP, torch.compile, and the attribute
#: names training code keeps a backbone under. Stripped only when every key has them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
#: Where training checkpoints keep the weights, in timm's order of preference (EMA weights first).
CHECKPOINT_ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a ``.pth``/``.bin`` (weights only) or ``.safetensors`` file, and where in it it was."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling, safetensors and I/O errors all mean "unreadable"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ADError(f"backbone.weights: cannot read checkpoint '{path}' ({reason}); save it with "
                      f"torch.save(model.state_dict(), path)") from None
    entry = next((key for key in CHECKPOINT_ENTRIES if isinstance(checkpoint, dict)
                  and isinstance(checkpoint.get(key), dict)), None)
    state = checkpoint[entry] if entry else checkpoint
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        found = ", ".join(map(str, list(checkpoint)[:5])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ADError(f"backbone.weights: '{path}' holds no state dict of tensors (found: {found}); save one with "
                      f"torch.save(model.state_dict(), path)")
    return state, f"its '{entry}' entry" if entry else "the whole file"


def strip_wrapper_prefix(
    state: dict[str, torch.Tensor], known: Container[str] = ()
) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the ``WRAPPER_PREFIXES`` that every key shares (``module.backbone.`` too); returns what was removed.

    Nothing is removed once a key is one of the architecture's ``known`` weight names, so a model
    whose own modules sit under ``model.`` keeps its keys.
    """
    removed = ""
    while state and not any(key in known for key in state) and (
        prefix := next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
    ):
        state = {key[len(prefix):]: value for key, value in state.items()}
        removed += prefix
    return state, removed


def _listed(keys: list[str], limit: int = 3) -> str:
    """The first ``limit`` keys and how many there are, for a one-line message."""
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@functools.cache
def reference_weights(name: str) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """The shape of every weight of timm's ``name`` but its classifier head, and the head's key prefixes."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{head}." for head in ((classifier,) if isinstance(classifier, str) else classifier))
    expected = {key: tuple(t.shape) for key, t in reference.state_dict().items() if not key.startswith(heads)}
    return expected, heads


def check_fits(state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """ADError unless ``state`` holds every weight of timm's ``name`` at its shape, and nothing else.

    The classifier head may be absent or of any size (features-only models drop it, as timm does),
    and so may batch-norm ``num_batches_tracked`` counters (torchvision's older files have none;
    batch norm fills them in). timm itself loads a features-only model non-strictly, so a checkpoint
    under another prefix or without some layers loaded partly or not at all, without an error.
    """
    expected, heads = reference_weights(name)
    missing = [key for key in expected if key not in state and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in state if key not in expected and not key.startswith(heads)]
    wrong = [f"{key} {tuple(state[key].shape)} for {expected[key]}" for key in expected
             if key in state and tuple(state[key].shape) != expected[key]]
    problems = [f"{what} {_listed(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape:", wrong)) if keys]
    if problems:
        raise ADError(f"backbone.weights: '{path}' does not fit backbone {name}: {'; '.join(problems)}; pass a "
                      f"state dict of {name} (keys like {next(iter(expected))})")


def load_checkpoint(name: str, out_indices: list[int], path: Path) -> nn.Module:
    """The features-only model with every weight from a local checkpoint, or an ADError saying what does not fit."""
    state, where = read_checkpoint(path)
    state, prefix = strip_wrapper_prefix(state, known=reference_weights(name)[0])
    check_fits(state, name, path)
    stripped = f", prefix '{prefix}' stripped from every key" if prefix else ""
    log.info("backbone.weights: %d tensors of %s from %s of %s%s", len(state), name, where, path, stripped)
    return _create(name, out_indices, state_dict=state)


def _random_init_warning(reason: str) -> None:
    message = (
        f"\n{'!' * 78}\n!! ImageNet weights unavailable ({reason}).\n"
        "!! Continuing with RANDOMLY INITIALISED backbone weights: results are NOT comparable to\n"
        "!! published numbers. Pass a local checkpoint with backbone.weights=/path/to/weights.pth,\n"
        f"!! or pre-fetch the weights while online.\n{'!' * 78}"
    )
    log.warning(message)


def build_feature_model(name: str, layers: list[str], weights: str,
                        tag: str | None) -> tuple[nn.Module, str, str | None]:
    """Create the truncated timm model; return it with its weights source and the file its weights came from.

    The file is None for random weights, and for ImageNet weights timm fetched from a plain URL.
    """
    import timm

    out_indices = layer_indices(name, layers)
    if weights == "random":
        return _create(name, out_indices), "random", None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ADError(f"backbone.weights: '{weights}' is neither imagenet, random nor an existing checkpoint file")
        return load_checkpoint(name, out_indices, path), "file", str(path.resolve())

    full_name = f"{name}.{tag}" if tag else name
    if tag and full_name not in timm.list_pretrained(f"{name}.*"):
        available = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")]
        raise ADError(f"backbone.tag: '{tag}' is not a pretrained tag of {name}; available: {available}")
    cfg = timm.models.get_pretrained_cfg(full_name)
    hf_hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if hf_hub_id and (cached := _cached_hub_file(hf_hub_id)):
        return _create(full_name, out_indices, file=cached), "imagenet", cached
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hf_hub_id else getattr(cfg, "url", "")
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or not url or not _host_reachable(url):
        _random_init_warning(f"{full_name} is not cached locally and {url or 'the hub'} is unreachable")
        return _create(name, out_indices), "random", None
    try:
        model = _create(full_name, out_indices, pretrained=True)
    except Exception as exc:  # any download failure: the contract is to warn loudly and go on
        _random_init_warning(f"download of {full_name} failed: {str(exc).splitlines()[0][:200]}")
        return _create(name, out_indices), "random", None
    return model, "imagenet", _cached_hub_file(hf_hub_id) if hf_hub_id else None
