"""The sequence a sequence-parallel forward is running: read by the `reasonrl_sparse` attention layers.

While `ring_forward(...)` is active, every attention call without a KV cache treats its q / k / v as this rank's
striped share of one sequence (`reasonrl.kernels.ring`) and attends with the sparse ring over `group`.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RingContext:
    group: Any  # torch.distributed process group of the ranks sharing the sequence
    valid_len: int  # real tokens; the rest (up to a multiple of W * G) is padding at the end
    hierarchical: bool = False
    local_world_size: int | None = None


_ACTIVE: contextvars.ContextVar[RingContext | None] = contextvars.ContextVar("reasonrl_ring", default=None)


@contextlib.contextmanager
def ring_forward(context: RingContext):
    token = _ACTIVE.set(context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_ring() -> RingContext | None:
    return _ACTIVE.get()
