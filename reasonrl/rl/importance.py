"""Train/inference mismatch: importance weights between the trainer's and the rollout engine's log-probs.

The engine (vLLM, or `generate`) samples from pi_rollout; the trainer's pi_old differs slightly (kernels, precision,
a stale sync). The policy-gradient term is reweighted by w = pi_old / pi_rollout of the sampled tokens:

    delta_t = logp_old_t - logp_rollout_t                       (valid tokens only)
    level "token":     w_t = exp(delta_t)
    level "sequence":  w_i = exp(sum_t delta_t), the same for every token of sequence i (product of token ratios)
    (the exponent is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20] first, as the policy ratio is, so
    the weights and metrics stay finite: a ratio beyond e^20 is truncated or masked all the same)
    mode "truncate":   w <- min(w, cap)                          (truncated IS, as TRL's *_truncate and verl's TIS)
    mode "mask":       w <- w if floor <= w <= cap else 0        (TRL's *_mask: drop tokens/sequences off the range)

The weights carry no gradient. Metrics (over valid tokens): sampling/logp_diff_mean and sampling/logp_diff_max of
|delta|, sampling/is_ratio_min/mean/max of the weights before truncation or masking.
"""

from __future__ import annotations

import torch

from reasonrl.rl.losses import LOG_RATIO_CLAMP

IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    floor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights [N, T] (0 on padding) and the mismatch metrics (0-dim tensors)."""
    if level not in IS_LEVELS:
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if old_logp.shape != rollout_logp.shape or old_logp.shape != mask.shape or old_logp.dim() != 2:
        raise ValueError(f"old_logp, rollout_logp and mask must be the same [N,T] shape, got {tuple(old_logp.shape)}, "
                         f"{tuple(rollout_logp.shape)}, {tuple(mask.shape)}")
    m = mask.bool()
    delta = torch.where(m, old_logp.detach().double() - rollout_logp.detach().double(), 0.0)
    log_w = delta if level == "token" else delta.sum(-1, keepdim=True).expand_as(delta)
    raw = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode == "truncate":
        weights = raw.clamp(max=cap)
    else:
        weights = torch.where((raw >= floor) & (raw <= cap), raw, torch.zeros_like(raw))
    weights = torch.where(m, weights, torch.zeros_like(weights))
    metrics = _metrics(delta.abs(), raw, m)
    return weights.to(old_logp.dtype), metrics


def _metrics(abs_delta: torch.Tensor, raw: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    if not bool(m.any()):
        zero = torch.zeros((), dtype=torch.float64)
        return {"sampling/logp_diff_mean": zero, "sampling/logp_diff_max": zero, "sampling/is_ratio_min": zero + 1,
                "sampling/is_ratio_mean": zero + 1, "sampling/is_ratio_max": zero + 1}
    return {
        "sampling/logp_diff_mean": abs_delta[m].mean(),
        "sampling/logp_diff_max": abs_delta[m].max(),
        "sampling/is_ratio_min": raw[m].min(),
        "sampling/is_ratio_mean": raw[m].mean(),
        "sampling/is_ratio_max": raw[m].max(),
    }
