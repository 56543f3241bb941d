"""Staleness of trained tokens: how many policy versions each lags the learner (asynchronous training).

A token sampled by the weights of version u and trained on by the learner at version v has staleness v - u. The
learner at step t holds version t (t updates applied); the synchronous loop trains every token at staleness 0.
"""

from __future__ import annotations

import torch


def oldest_versions(versions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] the oldest version among each row's tokens (`mask` [N, T]); a row without tokens gets the newest version
    of the batch, so it never counts as stale."""
    if versions.numel() == 0:
        return torch.zeros(versions.shape[0], dtype=torch.long)
    newest = versions[mask].max() if bool(mask.any()) else versions.new_zeros(())
    return torch.where(mask, versions, newest).min(-1).values


def stale_rows(versions: torch.Tensor, mask: torch.Tensor, *, learner_version: int, max_staleness: int) -> torch.Tensor:
    """[N] bool: rows with a token more than `max_staleness` versions behind `learner_version`."""
    return learner_version - oldest_versions(versions, mask) > max_staleness


def staleness_counts(versions: torch.Tensor, mask: torch.Tensor, *, learner_version: int) -> torch.Tensor:
    """[S + 1] the number of `mask` tokens at each staleness 0..S (S the largest present; a version newer than the
    learner's is an error: no engine can sample with weights the learner has not made)."""
    lag = learner_version - versions[mask]
    if lag.numel() and int(lag.min()) < 0:
        raise ValueError(f"a token has version {int(versions[mask].max())}, newer than the learner's {learner_version}")
    return torch.bincount(lag.long(), minlength=1)


def staleness_summary(counts: torch.Tensor) -> dict[str, float]:
    """Mean and max staleness from `staleness_counts` (summed over ranks); 0 with no tokens."""
    total = float(counts.sum())
    if total == 0:
        return {"async/staleness_mean": 0.0, "async/staleness_max": 0.0}
    lags = torch.arange(counts.numel(), dtype=torch.float64)
    present = (counts > 0).nonzero().squeeze(-1)
    return {"async/staleness_mean": float((lags * counts.double()).sum()) / total,
            "async/staleness_max": float(present.max())}
