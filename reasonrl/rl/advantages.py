"""Group-relative advantages for GRPO (rows grouped contiguously: N = P * G)."""

import torch

_SCALES = ("group", "batch", "none")


def grpo_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int,
    eps: float = 1e-4,
    unbiased_std: bool = True,
    scale: str = "group",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std + eps).

    scale="group": std of the group; "batch": std of all valid rewards in the batch
    (centering still uses group means); "none": Dr.GRPO, A_i = r_i - mean_g.
    Bessel-corrected std when ``unbiased_std`` (groups with <= 1 valid sample get
    std 0). Samples with ``valid == False`` are excluded from mean/std and get A = 0.
    """
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {_SCALES}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(f"number of rewards ({n}) is not divisible by group_size ({group_size})")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64 if out_dtype == torch.float64 else torch.float32)
    if valid is None:
        v = torch.ones_like(r, dtype=torch.bool)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid shape {tuple(valid.shape)} != rewards shape {tuple(rewards.shape)}")
        v = valid.to(device=r.device, dtype=torch.bool)
    r = torch.where(v, r, torch.zeros_like(r))  # NaN-safe for failed rewards
    vf = v.to(r.dtype)
    rg, vg = r.view(-1, group_size), vf.view(-1, group_size)

    cnt = vg.sum(-1, keepdim=True)
    mean = rg.sum(-1, keepdim=True) / cnt.clamp(min=1)
    centered = (rg - mean) * vg
    if scale == "none":
        adv = centered
    else:
        if scale == "group":
            ss, c = (centered**2).sum(-1, keepdim=True), cnt
        else:
            c = vf.sum()
            bmean = r.sum() / c.clamp(min=1)
            ss = (((r - bmean) * vf) ** 2).sum()
        denom = c - 1 if unbiased_std else c
        std = torch.where(denom > 0, ss / denom.clamp(min=1), torch.zeros_like(ss)).sqrt()
        adv = centered / (std + eps)
    return (adv.reshape(-1) * vf).to(out_dtype)
