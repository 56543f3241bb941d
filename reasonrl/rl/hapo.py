"""HAPO (Heterogeneous Adaptive Policy Optimization, arXiv 2509.16591): entropy-driven per-token adaptation.

Everything is driven by one per-token quantity, the normalized log-entropy ĥ ∈ [-1, 1] (docs/algorithms.md §1.0):

    e = log(max(H, 1e-8)),  m = quantile_p(e),  σ = rms(e - m),  h = (e - m) / σ,
    ĥ = h / pos_max (h > 0),  ĥ = h / |neg_min| (h <= 0)          ("paper" sign: ĥ < 0 = low entropy)

and three uses of it:

- ATS (§1.1, rollout):   T_t = T0 · (1 + τ ĥ_t)                                        -> `adaptive_temperature`
- AAC (§1.3, loss):      ε_low,t = ε_low (1 - α ĥ) for ĥ <= 0,  ε_high,t = ε_high (1 + α ĥ) for ĥ > 0
                                                                                      -> `adaptive_clip_bounds`
- DAR (§1.4, loss):      Ã = A (1 + β ĥ), used for high-entropy tokens whose ratio left the neutral band and for
                         low-entropy tokens whose ratio is inside it                   -> `redistribute_advantages`

`hapo_surrogate` puts AAC + DAR + (optional) dual clip together as a drop-in for `losses.clipped_surrogate`.

**Sign modes.** The released code multiplies h <= 0 by 1/neg_min (a negative number), so every token gets ĥ >= 0
("released_code": ĥ = |h| / |neg_min| below the pivot). The paper's figure needs ĥ < 0 for low-entropy tokens
("paper", the default). `EntropyStats.scale_neg` is always stored as the positive 1/|neg_min|; the sign mode is applied
when ĥ is computed.

**Statistics are batch-global.** The released code computes (m, σ, pos_max, neg_min) per micro-batch inside the loss,
so a token's ĥ (and the loss) depends on how the batch is split. Here the trainer computes `EntropyStats` once from all
valid token entropies of the batch (gathered from all ranks) and applies them to every micro-batch, which makes the
loss independent of the micro-batch split and of the number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from reasonrl.rl.losses import clipped_surrogate, policy_ratio

SIGN_MODES = ("paper", "released_code")

_LOSS_LOG_FLOOR = 1e-8  # e = log(max(H, 1e-8)) in the loss statistics (§1.0)
_SIGMA_MIN = math.sqrt(1e-8)  # σ is clamped at >= sqrt(1e-8) = 1e-4
_EXTREME_MIN = 1e-8  # pos_max >= 1e-8, neg_min <= -1e-8
_ATS_LOG_FLOOR = 1e-6  # the sampler uses log(max(H, 1e-6)) ...
_ATS_SIGMA_EPS = 1e-6  # ... and divides by (σ + 1e-6) (§1.1)


@dataclass(frozen=True)
class EntropyStats:
    """Batch statistics of token log-entropies that define ĥ.

    m:         the pivot, quantile_p of e = log(max(H, 1e-8)) over valid tokens.
    sigma:     sqrt(mean((e - m)^2)), the RMS around the pivot (not a std around the mean), >= 1e-4.
    scale_pos: 1 / pos_max, pos_max = max of h = (e - m) / sigma over tokens with h > 0.
    scale_neg: 1 / |neg_min|, neg_min = min of h over tokens with h < 0 (stored positive; see the module docstring).

    `EntropyStats.neutral()` (scales 0) gives ĥ = 0 for every token: T_t = T0, the base clip bounds and unchanged
    advantages. `to_list` / `from_list` give [m, sigma, scale_pos, scale_neg] for checkpoints and broadcasts.
    """

    m: float
    sigma: float
    scale_pos: float
    scale_neg: float

    def __post_init__(self):
        for name in ("m", "sigma", "scale_pos", "scale_neg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"EntropyStats.{name} must be a finite number, got {value!r}")
        if self.sigma <= 0:
            raise ValueError(f"EntropyStats.sigma must be > 0, got {self.sigma}")
        if self.scale_pos < 0 or self.scale_neg < 0:
            raise ValueError(
                f"EntropyStats.scale_pos/scale_neg must be >= 0 (scale_neg is 1/|neg_min|), "
                f"got {self.scale_pos}, {self.scale_neg}"
            )

    @classmethod
    def neutral(cls) -> EntropyStats:
        """Stats under which ĥ = 0 everywhere (no adaptation): used for an empty batch and before the first step."""
        return cls(m=0.0, sigma=1.0, scale_pos=0.0, scale_neg=0.0)

    @property
    def is_neutral(self) -> bool:
        return self.scale_pos == 0.0 and self.scale_neg == 0.0

    def to_list(self) -> list[float]:
        """[m, sigma, scale_pos, scale_neg]."""
        return [float(self.m), float(self.sigma), float(self.scale_pos), float(self.scale_neg)]

    @classmethod
    def from_list(cls, values: Iterable[float] | torch.Tensor) -> EntropyStats:
        """Inverse of `to_list`; also accepts a 4-element tensor (e.g. after a broadcast)."""
        if isinstance(values, torch.Tensor):
            values = values.detach().double().cpu().reshape(-1).tolist()
        values = [float(v) for v in values]
        if len(values) != 4:
            raise ValueError(f"values must hold [m, sigma, scale_pos, scale_neg], got {len(values)} numbers")
        return cls(*values)


def _check_sign_mode(sign_mode: str) -> None:
    if sign_mode not in SIGN_MODES:
        raise ValueError(f"sign_mode must be one of {SIGN_MODES}, got {sign_mode!r}")


def _nearest_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q, interpolation="nearest") for a non-empty 1-D x: the element of rank round(q (n - 1))
    (round half to even), via kthvalue, which has no input-size limit (torch.quantile refuses > 2^24 elements)."""
    k = round(q * (x.numel() - 1))
    return torch.kthvalue(x, k + 1).values


def entropy_stats(entropies_1d: torch.Tensor, *, pivot: float = 0.8) -> EntropyStats:
    """Statistics of a flat tensor of VALID token entropies (padding already removed), per algorithms.md §1.0:

        e = log(max(H, 1e-8))
        m = quantile_pivot(e), "nearest" interpolation (element of rank round(pivot (n-1)) in sorted order)
        σ = max( sqrt( Σ (e - m)^2 / n ), sqrt(1e-8) )
        h = (e - m) / σ
        pos_max = max(max{h : h > 0}, 1e-8),   neg_min = min(min{h : h < 0}, -1e-8)
        -> EntropyStats(m, σ, 1 / pos_max, 1 / |neg_min|)

    Pass the entropies of the whole batch, gathered from all ranks: the statistics are then batch-global and the
    HAPO loss does not depend on the micro-batch split (the released code computes them per micro-batch).
    An empty input gives `EntropyStats.neutral()`. With all entropies equal, h = 0 for every token (so ĥ = 0), σ is
    clamped to 1e-4 and both scales are 1e8 (nothing lies on either side of the pivot), as in the released code.
    """
    if not isinstance(entropies_1d, torch.Tensor) or entropies_1d.dim() != 1:
        shape = tuple(entropies_1d.shape) if isinstance(entropies_1d, torch.Tensor) else type(entropies_1d)
        raise ValueError(f"entropies_1d must be a 1-D tensor of valid-token entropies, got {shape}")
    if not 0.0 <= pivot <= 1.0:
        raise ValueError(f"pivot must be a quantile in [0, 1], got {pivot}")
    if entropies_1d.numel() == 0:
        return EntropyStats.neutral()
    dtype = torch.promote_types(entropies_1d.dtype, torch.float32)
    with torch.no_grad():
        e = entropies_1d.detach().to(dtype).clamp(min=_LOSS_LOG_FLOOR).log()
        if not torch.isfinite(e).all():
            raise ValueError("entropies_1d contains NaN or +inf")
        m = _nearest_quantile(e, pivot)
        h = e - m
        sigma = (h.square().sum() / h.numel()).sqrt().clamp(min=_SIGMA_MIN)
        h = h / sigma
        zero = torch.zeros((), dtype=dtype, device=h.device)
        pos_max = torch.where(h > 0, h, zero).max().clamp(min=_EXTREME_MIN)
        neg_min = torch.where(h < 0, h, zero).min().clamp(max=-_EXTREME_MIN)
        m, sigma, pos_max, neg_min = torch.stack([m, sigma, pos_max, neg_min]).double().cpu().tolist()
    return EntropyStats(m=m, sigma=sigma, scale_pos=1.0 / pos_max, scale_neg=1.0 / abs(neg_min))


def _h_hat(
    entropy: torch.Tensor,
    stats: EntropyStats,
    *,
    sign_mode: str,
    log_floor: float,
    sigma_eps: float,
    clamp: bool,
) -> torch.Tensor:
    """h = (log(max(H, log_floor)) - m) / (σ + sigma_eps); ĥ = h·scale_pos (h > 0), else h·scale_neg ("paper")
    or |h|·scale_neg ("released_code"); optionally clamped to [-1, 1]."""
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    e = entropy.detach().to(dtype).clamp(min=log_floor).log()
    h = (e - stats.m) / (stats.sigma + sigma_eps)
    below = h * stats.scale_neg if sign_mode == "paper" else h.abs() * stats.scale_neg
    h_hat = torch.where(h > 0, h * stats.scale_pos, below)
    return h_hat.clamp(-1.0, 1.0) if clamp else h_hat


def normalized_log_entropy(
    entropy: torch.Tensor,
    stats: EntropyStats,
    *,
    sign_mode: str = "paper",
    log_floor: float = 1e-8,
    clamp: bool = True,
) -> torch.Tensor:
    """ĥ for every element of `entropy` (any shape; padding positions give meaningless values, mask them):

        h = (log(max(H, log_floor)) - m) / σ
        "paper":          ĥ = h · scale_pos  if h > 0,   h · scale_neg   if h <= 0      (ĥ ∈ [-1, 1], < 0 = low H)
        "released_code":  ĥ = h · scale_pos  if h > 0,   |h| · scale_neg if h <= 0      (ĥ ∈ [0, 1])

    For the entropies the stats were computed from, ĥ already lies in [-1, 1] (exactly ±1 at the extremes);
    `clamp` clips other entropies (e.g. of the current policy, or a different batch) to [-1, 1]. No gradient.
    """
    if not isinstance(entropy, torch.Tensor):
        raise TypeError(f"entropy must be a tensor, got {type(entropy).__name__}")
    if not isinstance(stats, EntropyStats):
        raise TypeError(f"stats must be an EntropyStats, got {type(stats).__name__}")
    _check_sign_mode(sign_mode)
    if not log_floor > 0:
        raise ValueError(f"log_floor must be > 0, got {log_floor}")
    with torch.no_grad():
        return _h_hat(entropy, stats, sign_mode=sign_mode, log_floor=log_floor, sigma_eps=0.0, clamp=clamp)


def adaptive_clip_bounds(
    h_hat: torch.Tensor, *, eps_low: float, eps_high: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric Adaptive Clipping (algorithms.md §1.3), per token:

        ĥ <= 0:  ε_low,t = ε_low (1 - α ĥ),   ε_high,t = ε_high          (low entropy: wider lower bound)
        ĥ > 0:   ε_low,t = ε_low,              ε_high,t = ε_high (1 + α ĥ) (high entropy: wider upper bound)

    The clipped objective then uses [1 - ε_low,t, 1 + ε_high,t]. With ĥ ∈ [-1, 1] and α = 1 each bound at most
    doubles. α = 0 gives the base bounds everywhere. Returns two tensors shaped like `h_hat`, in its dtype.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    low_entropy = h_hat <= 0
    eps_low_t = torch.where(low_entropy, eps_low * (1.0 - alpha * h_hat), torch.full_like(h_hat, eps_low))
    eps_high_t = torch.where(low_entropy, torch.full_like(h_hat, eps_high), eps_high * (1.0 + alpha * h_hat))
    return eps_low_t, eps_high_t


def redistribute_advantages(
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    h_hat: torch.Tensor,
    *,
    eps_low_t: torch.Tensor | float,
    eps_high_t: torch.Tensor | float,
    beta: float,
) -> torch.Tensor:
    """Differential Advantage Redistribution (algorithms.md §1.4), per token:

        neutral band B_t = (1 - ε_low,t / 2, 1 + ε_high,t / 2)   (open interval; (0.9, 1.1) for 0.2 / 0.2)
        Ã = A (1 + β ĥ)
        ĥ > 0  (high entropy):  A' = A if r ∈ B_t else Ã       (amplify tokens whose ratio already moved)
        ĥ <= 0 (low entropy):   A' = Ã if r ∈ B_t else A       (attenuate conservative tokens; paper sign)

    `advantages` is [N] (broadcast over tokens) or [N, T]; `ratio` and `h_hat` are [N, T]; the ε's are the adapted
    bounds from `adaptive_clip_bounds` (or floats). The ratio only selects the branch and is used without gradient;
    gradients through `advantages` pass unchanged. β = 0 returns the advantages unchanged. Returns [N, T].
    """
    if ratio.dim() != 2 or h_hat.shape != ratio.shape:
        raise ValueError(f"ratio and h_hat must both be [N,T], got {tuple(ratio.shape)} and {tuple(h_hat.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != ratio.shape[0]:
            raise ValueError(f"advantages [N] has N={advantages.shape[0]}, ratio has N={ratio.shape[0]}")
        advantages = advantages[:, None]
    elif advantages.shape != ratio.shape:
        raise ValueError(f"advantages must be [N] or [N,T] matching ratio {tuple(ratio.shape)}, "
                         f"got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    for name, eps in (("eps_low_t", eps_low_t), ("eps_high_t", eps_high_t)):
        if isinstance(eps, torch.Tensor):
            try:
                torch.broadcast_shapes(eps.shape, ratio.shape)
            except RuntimeError as err:
                raise ValueError(f"{name} of shape {tuple(eps.shape)} does not broadcast to {tuple(ratio.shape)}") from err
        elif eps < 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
    r = ratio.detach()
    in_band = (r > 1.0 - eps_low_t / 2) & (r < 1.0 + eps_high_t / 2)
    scaled = advantages * (1.0 + beta * h_hat.detach())
    use_scaled = torch.where(h_hat > 0, ~in_band, in_band)
    advantages, scaled = torch.broadcast_tensors(advantages, scaled)
    return torch.where(use_scaled, scaled, advantages.to(scaled.dtype))


def hapo_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    h_hat: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    alpha: float = 1.0,
    beta: float = 1.0,
    clip_ratio_c: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token HAPO loss (algorithms.md §1.5), [N, T], to be aggregated with `aggregate_token_mean`:

        r = exp(clamp(logp - old_logp, -20, 20))                  (`losses.policy_ratio`, finite for any log-probs)
        (ε_low,t, ε_high,t) = adaptive_clip_bounds(ĥ; ε_low, ε_high, α)                      (AAC, §1.3)
        A' = redistribute_advantages(A, r, ĥ; ε_low,t, ε_high,t, β)                            (DAR, §1.4)
        ℓ = -min(r A', clip(r, 1 - ε_low,t, 1 + ε_high,t) A')
        dual clip (clip_ratio_c = c > 1, only where A' < 0): ℓ = min(ℓ, -c A')

    `h_hat` comes from `normalized_log_entropy` of the current policy's entropies (no gradient). With α = β = 0 and no
    dual clip this is exactly `losses.clipped_surrogate`. The bounds are computed in float64 so that the base bounds
    round exactly like python floats. Metrics over valid tokens: clip/low_frac, clip/high_frac (as in
    clipped_surrogate, with the per-token bounds), clip/dual_frac, hapo/h_hat_mean, hapo/eps_low_mean,
    hapo/eps_high_mean, hapo/adv_changed_frac (fraction of tokens with A' != A).
    """
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"logp and old_logp must both be [N,T], got {tuple(logp.shape)} and {tuple(old_logp.shape)}")
    if h_hat.shape != logp.shape:
        raise ValueError(f"h_hat shape {tuple(h_hat.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages [N] has N={advantages.shape[0]}, logp has N={logp.shape[0]}")
        advantages = advantages[:, None].expand_as(logp)
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [N] or [N,T], got {tuple(advantages.shape)}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable dual clip), got {clip_ratio_c}")
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    elif mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    h64 = h_hat.detach().double()
    eps_low_t, eps_high_t = adaptive_clip_bounds(h64, eps_low=eps_low, eps_high=eps_high, alpha=alpha)
    ratio = policy_ratio(logp, old_logp)
    adv = advantages.to(logp.dtype)
    new_adv = redistribute_advantages(
        adv, ratio, h_hat.detach().to(logp.dtype), eps_low_t=eps_low_t.to(logp.dtype),
        eps_high_t=eps_high_t.to(logp.dtype), beta=beta,
    )
    # The clipping itself is the PPO surrogate with per-token bounds (float64 bounds, as the base bounds round).
    loss, clip = clipped_surrogate(logp, old_logp, new_adv, eps_low=eps_low_t, eps_high=eps_high_t, mask=mask,
                                   dual_clip=clip_ratio_c)
    with torch.no_grad():
        m = mask.bool()
        denom = m.sum().clamp(min=1).float()

        def mean(x):
            return torch.where(m, x, torch.zeros_like(x)).sum().float() / denom

        metrics = {
            **clip,
            "hapo/h_hat_mean": mean(h64),
            "hapo/eps_low_mean": mean(eps_low_t),
            "hapo/eps_high_mean": mean(eps_high_t),
            "hapo/adv_changed_frac": ((new_adv.detach() != adv.detach()) & m).sum() / denom,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def logits_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -Σ_v p_v log p_v of softmax(logits) over the last dim, in float32 (float64 for float64 logits);
    -inf logits (masked tokens) contribute 0."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    lsm = torch.log_softmax(logits.to(dtype), dim=-1)
    p = lsm.exp()
    return -torch.where(p > 0, p * lsm, torch.zeros_like(lsm)).sum(-1)


def adaptive_temperature(
    logits: torch.Tensor,
    *,
    base_temperature: float,
    stats: EntropyStats | None,
    tau: float,
    sign_mode: str = "paper",
) -> torch.Tensor:
    """Adaptive Temperature Sampling (algorithms.md §1.1): one temperature per row of raw logits [B, V] -> [B]:

        H = entropy(softmax(logits)) (float32, before any temperature / top-k / top-p)
        h = (log(max(H, 1e-6)) - m) / (σ + 1e-6)
        ĥ = clamp(h · scale_pos (h > 0) or h · scale_neg / |h| · scale_neg (h <= 0, by sign_mode), -1, 1)
        T_t = T0 (1 + τ ĥ)

    (The sampler uses 1e-6 where the loss statistics use 1e-8, as in the released code.) `stats=None` (no statistics
    yet, e.g. the first step) or τ = 0 give T_t = T0 for every row. Requires 0 <= τ < 1 so that T_t > 0.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [B,V], got {shape}")
    if not base_temperature > 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    if stats is not None and not isinstance(stats, EntropyStats):
        raise ValueError(f"stats must be an EntropyStats or None, got {type(stats).__name__}")
    _check_sign_mode(sign_mode)
    with torch.no_grad():
        if stats is None or tau == 0.0:
            return torch.full((logits.shape[0],), float(base_temperature), dtype=torch.float32, device=logits.device)
        return temperature_from_entropy(logits_entropy(logits).float(), base_temperature=base_temperature,
                                        stats=stats, tau=tau, sign_mode=sign_mode)


def temperature_from_entropy(
    entropy: torch.Tensor, *, base_temperature: float, stats: EntropyStats, tau: float, sign_mode: str = "paper"
) -> torch.Tensor:
    """T_t = T0 (1 + τ ĥ(H)) for entropies H of any shape (the sampler's formula of `adaptive_temperature`, from
    entropies already computed, e.g. to log the temperatures a batch was sampled with)."""
    with torch.no_grad():
        h_hat = _h_hat(
            entropy, stats, sign_mode=sign_mode, log_floor=_ATS_LOG_FLOOR, sigma_eps=_ATS_SIGMA_EPS, clamp=True
        )
        return base_temperature * (1.0 + tau * h_hat)
