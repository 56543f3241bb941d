"""Train/inference mismatch: importance weights between the trainer's and the rollout engine's log-probs.

The engine (vLLM, or `generate`) samples from pi_rollout; the trainer's pi_old differs slightly (kernels, precision,
a stale sync). The policy-gradient term is reweighted by w = pi_old / pi_rollout of the sampled tokens:

    delta_t = logp_old_t - logp_rollout_t                       (valid tokens only)
    level "token":     w_t = exp(delta_t)
    level "sequence":  w_i = exp(sum_t delta_t), the same for every token of sequence i (product of token ratios)
    level "geometric": w_i = exp(sum_t delta_t / n_i), n_i = valid tokens of sequence i (geometric mean of the ratios)
    (the exponent is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20] first, as the policy ratio is, so
    the weights and metrics stay finite: a ratio beyond e^20 is truncated or masked all the same)
    mode "truncate":   w <- min(w, cap)                          (truncated IS, as TRL's *_truncate and verl's TIS)
    mode "mask":       w <- w if floor <= w <= cap else 0        (TRL's *_mask: drop tokens/sequences off the range;
                                                                 IcePop at level "token")
    mode "seq_mask":   w <- min(w, cap) * [floor <= g_i <= cap], g_i = exp(sum_t delta_t / n_i) the geometric-mean
                       ratio of sequence i (verl's geometric rejection sampling: a whole completion is dropped)

The weights carry no gradient. Metrics (over valid tokens): sampling/logp_diff_mean and sampling/logp_diff_max of
|delta|, sampling/is_ratio_min/mean/max of the weights before truncation or masking; mode "seq_mask" adds
sampling/seq_masked_frac, the fraction of the sequences with a valid token that the rejection drops.
"""

from __future__ import annotations

import torch

from reasonrl.rl.losses import LOG_RATIO_CLAMP

IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask", "seq_mask")


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
    raw = _ratio(_log_weights(delta, m, level)).expand_as(delta)
    if mode == "mask":
        weights = torch.where((raw >= floor) & (raw <= cap), raw, torch.zeros_like(raw))
    else:
        weights = raw.clamp(max=cap)
    metrics = _metrics(delta.abs(), raw, m)
    if mode == "seq_mask":
        geometric = _ratio(_log_weights(delta, m, "geometric"))  # [N, 1]
        rejected = (geometric < floor) | (geometric > cap)
        weights = torch.where(rejected, torch.zeros_like(weights), weights)
        has_tokens = m.any(-1, keepdim=True)
        metrics["sampling/seq_masked_frac"] = (rejected & has_tokens).sum().double() / has_tokens.sum().clamp(min=1)
    weights = torch.where(m, weights, torch.zeros_like(weights))
    return weights.to(old_logp.dtype), metrics


def _log_weights(delta: torch.Tensor, m: torch.Tensor, level: str) -> torch.Tensor:
    """log w of `level` from the per-token log-ratios `delta` (0 on padding): [N, T] for "token", else one value
    per sequence [N, 1] (the sum of its deltas, or their mean over its valid tokens for "geometric")."""
    if level == "token":
        return delta
    row = delta.sum(-1, keepdim=True)
    return row / m.sum(-1, keepdim=True).clamp(min=1) if level == "geometric" else row


def _ratio(log_w: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


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
