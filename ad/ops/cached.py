"""Look values up by key, compute only the misses, store them: the pattern of every on-disk cache use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from ad.cache import DiskCache

K = TypeVar("K")
V = TypeVar("V")


def lookup_or_compute(
    keys: Sequence[K],
    load: Callable[[K], V | None],
    compute: Callable[[list[int]], Sequence[V]],
    store: Callable[[K, V], None],
) -> tuple[list[V], list[int]]:
    """One value per key: what ``load`` finds, else what ``compute`` gives, which ``store`` then keeps.

    Args:
        keys: (N,) cache keys, one per value.
        load: a key's stored value, or None when it has none (or none that will do).
        compute: values for the positions (into ``keys``) that ``load`` missed, in their order;
            called once, and only when something is missing.
        store: keeps a computed value under its key.

    Returns:
        The (N,) values in key order, and the positions that were computed.
    """
    found = [load(key) for key in keys]
    missing = [i for i, value in enumerate(found) if value is None]
    if missing:
        computed = compute(missing)
        if len(computed) != len(missing):
            raise ValueError(f"lookup_or_compute: compute gave {len(computed)} values for {len(missing)} misses")
        for i, value in zip(missing, computed, strict=True):
            found[i] = value
            store(keys[i], value)
    return found, missing


def cached_per_item(
    cache: DiskCache,
    kind: str,
    keys: Sequence[str],
    batch: torch.Tensor,
    compute: Callable[[torch.Tensor], Sequence[torch.Tensor]],
) -> list[torch.Tensor]:
    """``compute(batch)`` through ``cache``, item by item: only the items whose key it lacks are computed.

    Args:
        cache: where entries live, under ``kind``; new ones are written asynchronously.
        kind: the cache's namespace for these entries.
        keys: (B,) one key per item of ``batch``, naming everything its outputs depend on.
        batch: (B, ...) the items.
        compute: (b, ...) items -> outputs, each (b, ...) with one row per item.

    Returns:
        The outputs for the whole batch, each (B, ...) on ``batch``'s device; when nothing was
        cached, exactly what ``compute(batch)`` gave (no copy, its dtype and memory layout kept).
    """
    computed = []

    def compute_misses(missing: list[int]) -> list[list[torch.Tensor]]:
        computed.append(compute(batch if len(missing) == len(keys) else batch[missing]))
        # clone: saving a view would write the whole batch's storage
        return [[out[j].detach().cpu().clone() for out in computed[0]] for j in range(len(missing))]

    found, missing = lookup_or_compute(keys, lambda key: cache.load(kind, key), compute_misses,
                                       lambda key, entry: cache.save_async(kind, key, entry))
    if len(missing) == len(keys):
        return list(computed[0])
    return [torch.stack([entry[i] for entry in found]).to(batch.device) for i in range(len(found[0]))]
