"""Argument checks shared by the pure math modules."""

from __future__ import annotations

import operator


def as_int(value, name: str, low: int, high: int | None = None) -> int:
    """operator.index(value) (ints, numpy/0-d integer tensors; not bool or float) within [low, high]; a ValueError
    naming `name` otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if v < low or (high is not None and v > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {v}")
    return v
