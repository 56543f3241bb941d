"""The two-member gloo group that carries weight pushes from a trainer (rank 0) to a `reasonrl serve` server (rank 1).

No vLLM import here: the trainer side needs only torch. The server side is ``gloo_transfer``.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

GROUP_SIZE = 2


def rendezvous_store(master_address: str, master_port: int, *, is_master: bool, timeout_s: float):
    """The TCP store both members meet at; the trainer hosts it (``master_port=0`` picks a free port: read
    ``store.port``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(master_address, master_port, GROUP_SIZE, is_master=is_master, timeout=timeout,
                         wait_for_workers=False)


def join_group(store, *, rank: int, group_id: str, timeout_s: float):
    """A private two-member gloo group, outside the process's default group; blocks until both members joined.
    ``group_id`` names its keys in the store (random per group; not a secret)."""
    prefixed = dist.PrefixStore(f"reasonrl-weights/{group_id}", store)
    return dist.ProcessGroupGloo(prefixed, rank, GROUP_SIZE, datetime.timedelta(seconds=timeout_s))


def broadcast_from_trainer(group, buffer: torch.Tensor, *, timeout_s: float | None = None) -> None:
    """``buffer`` from rank 0 to rank 1. ``timeout_s`` bounds this one broadcast (None: the group's timeout): gloo
    then raises, and the pair is closed for good (the group must be formed again)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    if timeout_s is not None:
        options.timeout = datetime.timedelta(seconds=timeout_s)
    group.broadcast([buffer], options).wait()
