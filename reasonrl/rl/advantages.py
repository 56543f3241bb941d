"""Group-relative advantages for GRPO-family estimators (rows grouped contiguously: N = P * G).

Group g is rows [g*G, (g+1)*G). ``valid`` (bool [N], optional) marks samples whose reward exists; invalid samples
are excluded from every group statistic and get advantage 0. Every estimator returns one value per sample ([N]),
to be broadcast over that sample's response tokens, and follows the same rules for degenerate inputs:

- a group whose valid rewards are all equal gets exactly 0 (no rounding residue of r - mean);
- a non-finite (NaN or ±inf) reward on a VALID sample makes every advantage computed from it NaN: the valid
  samples of its group (with scale="batch", whose std spans the batch: every valid sample), so that the trainer's
  non-finite checks stop the run instead of training on a silent 0. Invalid samples stay 0, whatever their reward.
"""

import math
from collections.abc import Sequence

import torch

_SCALES = ("group", "batch", "none")

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "hapo")


def _prepare(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None, *, compute_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """Validate (rewards, group_size, valid); return (r, v, bad, out_dtype).

    ``r`` is rewards cast to the compute dtype with invalid and non-finite entries zeroed, so the estimators compute
    on finite numbers; ``v`` is the bool validity mask [N]; ``bad`` [P, 1] marks the groups holding a non-finite
    valid reward, which `_finish` turns to NaN. The compute dtype is ``compute_dtype`` if given, else float64 for
    float64 input and float32 otherwise; the output dtype is the rewards' float dtype, or float32 for integer rewards.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(f"number of rewards ({n}) is not divisible by group_size ({group_size})")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if compute_dtype is None:
        compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    r = rewards.to(compute_dtype)
    if valid is None:
        v = torch.ones_like(r, dtype=torch.bool)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid shape {tuple(valid.shape)} != rewards shape {tuple(rewards.shape)}")
        v = valid.to(device=r.device, dtype=torch.bool)
    finite = torch.isfinite(r)
    bad = (v & ~finite).view(-1, group_size).any(-1, keepdim=True)  # [P, 1]
    r = torch.where(v & finite, r, torch.zeros_like(r))
    return r, v, bad, out_dtype


def _finish(adv: torch.Tensor, vg: torch.Tensor, bad: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[P, G] -> [N] in ``out_dtype`` under the module's rules: invalid samples 0, valid samples of ``bad`` groups
    NaN."""
    adv = torch.where(vg, adv, torch.zeros_like(adv))
    adv = torch.where(vg & bad, torch.full_like(adv, math.nan), adv)
    return adv.reshape(-1).to(out_dtype)


def _constant_groups(rg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[P, 1] bool: True where all entries of the group selected by ``mask`` are exactly equal (or none selected)."""
    inf = torch.full_like(rg, math.inf)
    hi = torch.where(mask, rg, -inf).amax(-1, keepdim=True)
    lo = torch.where(mask, rg, inf).amin(-1, keepdim=True)
    return ~(hi > lo)


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
    std 0). Samples with ``valid == False`` are excluded from mean/std and get A = 0;
    all-equal groups get exactly 0 and non-finite valid rewards give NaN (module docstring).
    """
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {_SCALES}")
    r, v, bad, out_dtype = _prepare(rewards, group_size, valid)
    rg, vg = r.view(-1, group_size), v.view(-1, group_size)
    vf = vg.to(r.dtype)

    cnt = vf.sum(-1, keepdim=True)
    mean = rg.sum(-1, keepdim=True) / cnt.clamp(min=1)
    # an all-equal group is exactly 0: r - mean leaves rounding residue (0.3 x 6 in float32: 3e-8, / eps = 3e-4)
    centered = torch.where(vg & ~_constant_groups(rg, vg), rg - mean, torch.zeros_like(rg))
    if scale == "none":
        adv = centered
    else:
        if scale == "group":
            ss, c = (centered**2).sum(-1, keepdim=True), cnt
        else:
            c = vf.sum()
            bmean = r.sum() / c.clamp(min=1)
            ss = torch.where(v, r - bmean, torch.zeros_like(r)).square().sum()
            bad = bad.any().expand_as(bad)  # the batch std depends on every valid reward
        denom = c - 1 if unbiased_std else c
        std = torch.where(denom > 0, ss / denom.clamp(min=1), torch.zeros_like(ss)).sqrt()
        adv = centered / (std + eps)
    return _finish(adv, vg, bad, out_dtype)


def rloo_advantages(rewards: torch.Tensor, *, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out (RLOO) advantage: A_i = r_i - (S_g - r_i) / (c_g - 1).

    S_g is the sum and c_g the count of the valid rewards of i's group, so the baseline is the mean of the OTHER
    valid samples (equivalently A_i = c_g / (c_g - 1) * (r_i - mean_g)). Groups with c_g < 2 and groups whose
    valid rewards are all equal get exactly 0; invalid samples get 0. No std normalization.
    Computed in float64; returned in the rewards' float dtype (float32 for integer rewards).
    """
    r, v, bad, out_dtype = _prepare(rewards, group_size, valid, compute_dtype=torch.float64)
    rg, vg = r.view(-1, group_size), v.view(-1, group_size)
    cnt = vg.sum(-1, keepdim=True).to(r.dtype)
    others = (rg.sum(-1, keepdim=True) - rg) / (cnt - 1).clamp(min=1)
    keep = vg & (cnt >= 2) & ~_constant_groups(rg, vg)
    adv = torch.where(keep, rg - others, torch.zeros_like(rg))
    return _finish(adv, vg, bad, out_dtype)


def token_group_average_advantages(
    rewards: torch.Tensor,
    lengths: torch.Tensor | Sequence[float],
    *,
    group_size: int,
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize_std: bool = True,
    fallback_threshold: float | None = 5.0,
) -> tuple[torch.Tensor, int]:
    """HAPO Token-Level Group Average (TLGA) advantage; returns ``(advantages [N], n_fallback_groups)``.

    Every token of response i carries R_i; with token weights L_i over the valid samples of group g:
        mu_g    = sum_i L_i R_i / sum_i L_i
        sigma_g = sqrt( sum_i L_i (R_i - mu_g)^2 / sum_i L_i )          (population std over tokens)
        A_i     = (R_i - mu_g) / (sigma_g + eps)     (normalize_std)  or  R_i - mu_g   (not normalize_std)
    Safeguard: if |A_i| >= ``fallback_threshold`` for any sample of the group that has tokens (L_i > 0), the
    whole group falls back to the ordinary GRPO advantage over its valid rewards (L ignored):
        A_i = (R_i - m_g) / (s_g + eps)  (or R_i - m_g without normalize_std),  m_g = sample mean,
        s_g = unbiased (n-1) std; a group with a single valid sample uses m_g = 0, s_g = 1.
    ``fallback_threshold=None`` (or inf) disables the safeguard. A group whose token-bearing rewards are all equal
    gets exactly 0 and never falls back. Length-0 responses contribute no tokens, and — since the advantage is
    multiplied by the response mask — their advantage is 0, as is that of invalid samples.
    ``n_fallback_groups`` (a Python int) is the number of groups that used the GRPO fallback.
    Computed in float64; returned in the rewards' float dtype (float32 for integer rewards).
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if fallback_threshold is not None and not fallback_threshold > 0:
        raise ValueError(f"fallback_threshold must be > 0 or None, got {fallback_threshold}")
    r, v, bad, out_dtype = _prepare(rewards, group_size, valid, compute_dtype=torch.float64)
    lengths = torch.as_tensor(lengths)
    if lengths.shape != rewards.shape:
        raise ValueError(f"lengths shape {tuple(lengths.shape)} != rewards shape {tuple(rewards.shape)}")
    length = lengths.to(device=r.device, dtype=r.dtype)
    if not bool(torch.isfinite(length).all()) or bool((length < 0).any()):
        raise ValueError("lengths must be finite and >= 0")

    rg, vg = r.view(-1, group_size), v.view(-1, group_size)
    wg = torch.where(vg, length.view(-1, group_size), torch.zeros_like(rg))  # token counts, 0 where invalid
    has_tok = wg > 0
    zero = torch.zeros_like(rg)

    # token-level (length-weighted) mean and population std
    tokens = wg.sum(-1, keepdim=True)
    mu = (wg * rg).sum(-1, keepdim=True) / tokens.clamp(min=torch.finfo(r.dtype).tiny)
    centered = torch.where(_constant_groups(rg, has_tok), zero, rg - mu)
    if normalize_std:
        sigma = ((wg * centered**2).sum(-1, keepdim=True) / tokens.clamp(min=torch.finfo(r.dtype).tiny)).sqrt()
        tlga = torch.where(centered != 0, centered / (sigma + eps), zero)
    else:
        tlga = centered
    tlga = torch.where(has_tok, tlga, zero)

    if fallback_threshold is None or math.isinf(fallback_threshold):
        fallback = torch.zeros_like(tokens, dtype=torch.bool)
    else:
        fallback = (tlga.abs() >= fallback_threshold).any(-1, keepdim=True) & ~bad
    n_fallback = int(fallback.sum())
    adv = tlga
    if n_fallback:
        cnt = vg.sum(-1, keepdim=True).to(r.dtype)
        single = cnt == 1
        mean = torch.where(single, zero[:, :1], rg.sum(-1, keepdim=True) / cnt.clamp(min=1))
        dev = torch.where(vg, rg - mean, zero)
        if normalize_std:
            var = (dev**2).sum(-1, keepdim=True) / (cnt - 1).clamp(min=1)
            std = torch.where(single, torch.ones_like(var), var.sqrt())
            grpo = dev / (std + eps)
        else:
            grpo = dev
        adv = torch.where(fallback, torch.where(has_tok, grpo, zero), tlga)
    return _finish(adv, vg, bad, out_dtype), n_fallback


def compute_advantages(
    rewards: torch.Tensor,
    *,
    estimator: str,
    group_size: int,
    valid: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    eps: float,
    unbiased_std: bool,
    scale: str,
    fallback_threshold: float | None = 5.0,
) -> tuple[torch.Tensor, dict]:
    """Dispatch to an advantage estimator; returns ``(advantages [N], metrics)``.

    - "grpo":    grpo_advantages(eps, unbiased_std, scale)                              metrics {}
    - "dr_grpo": grpo_advantages with scale="none" (the ``scale``/``eps``/``unbiased_std`` args are ignored)
    - "rloo":    rloo_advantages (A_i = r_i - mean of the other valid samples; eps/unbiased_std/scale ignored)
    - "hapo":    token_group_average_advantages(lengths required, eps, fallback_threshold); scale "group" ->
                 std-normalized, "none" -> centering only, "batch" is rejected; unbiased_std ignored (TLGA uses the
                 population token std, its GRPO fallback the unbiased sample std).
                 metrics {"adv/fallback_groups": int}

    Every estimator applies the same rules (module docstring), whatever ``scale``:
    - ``valid == False`` (the reward function failed): advantage 0, the reward (NaN or anything) is excluded from
      every statistic;
    - a NaN or ±inf reward on a sample marked valid: NaN for every valid sample of its group (for "grpo" with
      scale="batch": every valid sample of the batch), 0 for its group's invalid samples; other groups are
      unaffected. The trainer then stops on the non-finite loss rather than training on a silent 0;
      "adv/fallback_groups" does not count such a group;
    - a group whose valid rewards are all equal: exactly 0.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {_SCALES}")
    if estimator == "grpo":
        adv = grpo_advantages(rewards, group_size=group_size, eps=eps, unbiased_std=unbiased_std, scale=scale,
                              valid=valid)
        return adv, {}
    if estimator == "dr_grpo":
        return grpo_advantages(rewards, group_size=group_size, scale="none", valid=valid), {}
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size=group_size, valid=valid), {}
    if lengths is None:
        raise ValueError("estimator 'hapo' needs lengths (response token counts [N])")
    if scale == "batch":
        raise ValueError("scale 'batch' is not supported by estimator 'hapo'; use 'group' or 'none'")
    adv, n_fb = token_group_average_advantages(
        rewards, lengths, group_size=group_size, valid=valid, eps=eps, normalize_std=scale == "group",
        fallback_threshold=fallback_threshold,
    )
    return adv, {"adv/fallback_groups": n_fb}
