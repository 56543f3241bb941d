"""Preemption: a SIGTERM (or SIGUSR1, which SLURM can send ahead of time with --signal) makes the trainer finish
its current step, write a checkpoint and exit with status 143, so that `trainer.resume=auto` continues from there.

The handler only records the signal; the loop checks it between steps, and all ranks agree (a max-reduce) so
that a signal reaching only some processes still stops every one of them at the same step.
"""

from __future__ import annotations

import signal
from typing import Self

import torch

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class PreemptionWatch:
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> Self:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = signum

    def requested(self, acc) -> bool:
        """True on every rank if any rank received a preemption signal."""
        flag = torch.tensor(0.0 if self.received is None else 1.0, device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "SIGTERM/SIGUSR1 (another rank)"
