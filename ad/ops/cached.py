"""Look values up by key, compute only the misses, store them: the pattern of every on-disk cache use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

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
