"""Between scoring and the optimizer: reward shaping, advantages, D3S down-sampling and HAPO entropy statistics.

The math lives in `reasonrl.rl`; these functions apply it to a rank's rows, gathering from every rank what a
batch-level statistic needs, so the result does not depend on how the batch is split across processes.
"""

from __future__ import annotations

import torch

from reasonrl.rl.d3s import (
    keep_fraction_at,
    select_rollouts,
    select_tokens,
    token_score_threshold,
    tokens_at_or_above,
)
from reasonrl.rl.hapo import EntropyStats, entropy_stats, normalized_log_entropy, temperature_from_entropy
from reasonrl.rl.shaping import truncated_mask


def gather_valid_values(acc, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The non-negative `values[mask]` of every rank, concatenated (ranks may hold different counts)."""
    local = values[mask.bool()].float().to(acc.device)
    if acc.num_processes == 1:
        return local
    if bool((local < 0).any()):
        raise ValueError("gather_valid_values expects non-negative values (negative numbers mark padding)")
    padded = acc.pad_across_processes(local, dim=0, pad_index=-1.0)
    every = acc.gather(padded)
    return every[every >= 0]


def loss_mask_for(batch, valid: torch.Tensor, *, mask_truncated: bool) -> torch.Tensor:
    """Tokens that may count in the loss: those of samples with a valid reward, minus truncated completions if
    DAPO's overlong filtering is on (their rewards still take part in the group statistics)."""
    keep = valid.bool().clone()
    if mask_truncated:
        keep &= ~truncated_mask(batch.finish_reasons)
    return batch.model_mask() & keep[:, None]


def d3s_keep_fractions(d3s, *, step: int, total_steps: int) -> tuple[float, float]:
    """(rollout, token) keep fractions of this step (0-based), rising from the start values to keep_end."""
    def at(start: float) -> float:
        return keep_fraction_at(step, total_steps, start=start, end=d3s.keep_end, ramp_fraction=d3s.ramp_fraction,
                                shape=d3s.schedule)
    return at(d3s.sample_keep_start), at(d3s.token_keep_start)


def d3s_rollout_keep(all_advantages: torch.Tensor, d3s, *, keep_fraction: float, group_size: int) -> torch.Tensor:
    """bool [N_global]: rollouts kept by maximum advantage variance (same result on every rank)."""
    return select_rollouts(all_advantages, group_size=group_size, keep_fraction=keep_fraction,
                           scope=d3s.sample_scope, min_keep=d3s.min_keep)


def d3s_token_mask(acc, advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, *,
                   keep_fraction: float, scope: str) -> torch.Tensor:
    """bool [N, T]: tokens with the largest |A| x H (H: entropy of the sampling policy). Scope "batch" uses one
    threshold over every rank's tokens; "sequence" keeps the top fraction of each row."""
    if keep_fraction >= 1.0:
        return mask
    scores = advantages.abs().to(entropy)[:, None] * entropy
    if scope == "sequence":
        return select_tokens(scores, mask, keep_fraction=keep_fraction, scope="sequence")
    threshold = token_score_threshold(gather_valid_values(acc, scores, mask), keep_fraction)
    return tokens_at_or_above(scores, mask, threshold)


def hapo_entropy_stats(acc, entropy: torch.Tensor, mask: torch.Tensor, *, pivot: float) -> EntropyStats:
    """HAPO's pivot/scale statistics over the valid tokens of the whole batch (every rank)."""
    return entropy_stats(gather_valid_values(acc, entropy, mask), pivot=pivot)


def hapo_h_hat(entropy: torch.Tensor, stats: EntropyStats, *, sign_mode: str) -> torch.Tensor:
    return normalized_log_entropy(entropy, stats, sign_mode=sign_mode)


def adaptive_temperature_metrics(acc, entropy: torch.Tensor, mask: torch.Tensor, *, stats: EntropyStats,
                                 base_temperature: float, tau: float, sign_mode: str) -> dict[str, float]:
    """Mean / min / max over the batch's tokens (every rank) of the temperatures HAPO's sampler used, recomputed from
    the step's entropies with the statistics it sampled with."""
    temps = temperature_from_entropy(gather_valid_values(acc, entropy, mask), base_temperature=base_temperature,
                                     stats=stats, tau=tau, sign_mode=sign_mode)
    if temps.numel() == 0:
        return {}
    return {"hapo/temperature_mean": temps.mean().item(), "hapo/temperature_min": temps.min().item(),
            "hapo/temperature_max": temps.max().item()}
