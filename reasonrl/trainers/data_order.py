"""Which prompts a step trains on: a pure function of (seed, step), so a resumed run continues exactly."""

from __future__ import annotations

import random


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def prompts_for_step(num_rows: int, *, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices of `step` (0-based): consecutive slices of per-epoch shuffles, wrapping across epochs."""
    if num_rows < 1:
        raise ValueError("no training rows")
    orders: dict[int, list[int]] = {}  # a step spans at most a few epochs: shuffle each once
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_rows)
        if epoch not in orders:
            orders[epoch] = epoch_permutation(num_rows, seed, epoch)
        out.append(orders[epoch][offset])
    return out
