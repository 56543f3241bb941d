"""Reward shaping and batch filtering helpers (DAPO, algorithms.md section 0).

Rows are grouped contiguously: N = P * G, group g = rows [g*G, (g+1)*G).
"""

from collections.abc import Sequence

import torch


def overlong_penalty(
    lengths: torch.Tensor | Sequence[float], *, max_len: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment R_len, to be ADDED to the correctness reward ([N] float, values in [-factor, 0]).

        R_len(L) = 0                                          if L <= max_len - buffer
                 = ((max_len - buffer) - L) / buffer * factor  if max_len - buffer < L <= max_len
                 = -factor                                     if L > max_len
    (continuous: reaches -factor at L = max_len). ``buffer`` (L_cache) must be in (0, max_len]; ``factor`` >= 0.
    Returned as float64 for float64 lengths, else float32.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in (0, max_len={max_len}], got {buffer}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    length = torch.as_tensor(lengths)
    if length.dim() != 1:
        raise ValueError(f"lengths must be 1-D [N], got shape {tuple(length.shape)}")
    length = length.to(torch.float64 if length.dtype == torch.float64 else torch.float32)
    if bool((length < 0).any()) or bool(torch.isnan(length).any()):
        raise ValueError("lengths must be >= 0")
    start = max_len - buffer
    soft = ((start - length) / buffer * factor).clamp(max=0.0)
    return torch.where(length > max_len, torch.full_like(length, -factor), soft)


def truncated_mask(finish_reasons: Sequence[str | None], *, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [N]: True where the completion hit the length limit (finish reason == "length").

    Used for DAPO overlong filtering (mask the loss of truncated samples).
    """
    if isinstance(finish_reasons, str):
        raise TypeError("finish_reasons must be a sequence of strings, not a single string")
    return torch.tensor([reason == "length" for reason in finish_reasons], dtype=torch.bool, device=device)


def groups_with_signal(
    rewards: torch.Tensor, valid: torch.Tensor | None, *, group_size: int, atol: float = 0.0
) -> torch.Tensor:
    """bool [P]: True for groups whose valid rewards are not all equal (DAPO dynamic sampling keeps these).

    keep_g = (#valid in g >= 2) and (max_valid r - min_valid r > atol). With the default atol = 0 any difference
    counts (an exact comparison, like verl's std > 0). ``valid=None`` means all samples are valid.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size})")
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    r = rewards.to(torch.float64)
    if valid is None:
        v = torch.ones_like(r, dtype=torch.bool)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid shape {tuple(valid.shape)} != rewards shape {tuple(rewards.shape)}")
        v = valid.to(device=r.device, dtype=torch.bool)
    rg, vg = r.view(-1, group_size), v.view(-1, group_size)
    inf = torch.full_like(rg, float("inf"))
    hi = torch.where(vg, rg, -inf).amax(-1)
    lo = torch.where(vg, rg, inf).amin(-1)
    return (vg.sum(-1) >= 2) & (hi - lo > atol)


def kl_reward_penalty(per_token_kl: torch.Tensor, mask: torch.Tensor, *, coef: float) -> torch.Tensor:
    """KL-in-reward penalty per sample: P_i = coef * sum_t mask_{i,t} * KL_{i,t}   ([N], dtype of per_token_kl).

    To be SUBTRACTED from the reward (r_i - P_i). Masked positions are ignored even if they hold NaN/inf.
    Gradients are not stopped: pass detached (old/ref) log-prob differences.
    """
    if per_token_kl.dim() != 2:
        raise ValueError(f"per_token_kl must be 2-D [N, T], got shape {tuple(per_token_kl.shape)}")
    if mask.shape != per_token_kl.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != per_token_kl shape {tuple(per_token_kl.shape)}")
    if coef < 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    kl = torch.where(mask.to(device=per_token_kl.device, dtype=torch.bool), per_token_kl,
                     torch.zeros_like(per_token_kl))
    return coef * kl.sum(-1)
