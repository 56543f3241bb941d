"""Reasoning-length control: token budgets, length rewards and token curricula (algorithms.md sections 3, 4, 5).

- RMT (section 3): dynamic token budget B_t, triangular length reward, entropy curriculum over tokens, RL + NTP loss.
- DRQA (section 4): generation-side concise-correct reward (the whole reward is our inference [INF]).
- e1 (section 5): adaptive-effort reward R_AEC and the per-prompt mean think length it is relative to.

Rows are grouped contiguously: N = P * G, group g = rows [g*G, (g+1)*G) (as in `reasonrl.rl.shaping`).
Every function is pure (numbers/tensors in, numbers/tensors out). The only state is `PromptLengthTracker`, an explicit
object the trainer owns and checkpoints. Float outputs are float64 when a float64 tensor goes in, else float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from reasonrl.rl.checks import as_int

BUDGET_VARIANTS = ("ratio_pow", "literal")
LENGTH_REWARD_SHAPES = ("rise_fall", "peak")
COMBINE_MODES = ("additive", "multiplicative")

Numeric = float | int | torch.Tensor | Sequence[float]


# ------------------------------------------------------------------------------------------------ validation helpers
def _real(value, name: str) -> float:
    """float(value) for a real number (or a one-element tensor); bools, NaN and non-numbers are rejected."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


def _in_range(value, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """_real(value) checked against the interval (low|[low, high]|high)."""
    v = _real(value, name)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return v


def _float_tensor(x: Numeric) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _vector(x: Numeric, name: str) -> torch.Tensor:
    """1-D float tensor without NaN."""
    t = _float_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} must not contain NaN")
    return t


def _lengths(x: Numeric, name: str = "lengths") -> torch.Tensor:
    t = _vector(x, name)
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    return t


def _per_row(x: Numeric, name: str, like: torch.Tensor, *, allow_nan: bool = False) -> torch.Tensor:
    """A number (broadcast) or a [N] tensor matching ``like``, as a float tensor on like's device."""
    t = _float_tensor(x).to(like.device)
    if t.dim() == 0:
        t = t.expand(like.shape)
    elif t.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} != per-row shape {tuple(like.shape)}")
    if not allow_nan and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} must not contain NaN")
    return t


def _correct_values(correct: Numeric, like: torch.Tensor) -> torch.Tensor:
    """Correctness reward per row as float ([N]; bool -> 0/1)."""
    c = torch.as_tensor(correct, device=like.device)
    if c.shape != like.shape:
        raise ValueError(f"correct shape {tuple(c.shape)} != per-row shape {tuple(like.shape)}")
    c = _float_tensor(c)
    if bool(torch.isnan(c).any()):
        raise ValueError("correct must not contain NaN")
    return c


def _bool_rows(x: Numeric | None, name: str, like: torch.Tensor) -> torch.Tensor:
    """bool [N] (nonzero = True); None -> all False."""
    if x is None:
        return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    t = torch.as_tensor(x, device=like.device)
    if t.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} != per-row shape {tuple(like.shape)}")
    return t.to(torch.bool)


def _num_groups(n: int, group_size) -> int:
    g = as_int(group_size, "group_size", 1)
    if n % g != 0:
        raise ValueError(f"number of rows ({n}) is not divisible by group_size ({g})")
    return n // g


def _clamped_steps(step, total_steps) -> tuple[float, float]:
    """(min(t, T), T) after checking t >= 0 and 1 <= T < inf."""
    t = _real(step, "step")
    big_t = _real(total_steps, "total_steps")
    if t < 0 or math.isinf(t):
        raise ValueError(f"step must be a finite number >= 0, got {step}")
    if big_t < 1 or math.isinf(big_t):
        raise ValueError(f"total_steps must be a finite number >= 1, got {total_steps}")
    return min(t, big_t), big_t


def _lerp(start: float, end: float, fraction: float) -> float:
    # (1 - f) * a + f * b is exact at both endpoints (a + (b - a) * f is not: 0.1 + (0.3 - 0.1) != 0.3)
    return (1.0 - fraction) * start + fraction * end


# ------------------------------------------------------------------------------------------------ RMT budget (3.1)
def rmt_budget(
    step, total_steps, *, initial: float | torch.Tensor, gamma: float, minimum: float, k: float = 1.0,
    variant: str = "ratio_pow",
) -> float | torch.Tensor:
    """RMT dynamic token budget B_t (algorithms.md 3.1).

        "ratio_pow" (default):  B_t = max(B_min, B_0 * gamma ** ((t / T) ** k))
        "literal":              B_t = max(B_min, B_0 * gamma ** (t / T ** k))

    The formula relayed from the paper [3P] is the literal t / T^k; "ratio_pow" is our reading of it [INF]. With k = 1
    both are B_0 * gamma ** (t / T). t is clamped to [0, T] (steps past T keep the final budget), so "ratio_pow" ends at
    max(B_min, B_0 * gamma); "literal" ends at max(B_min, B_0 * gamma ** (T ** (1 - k))).

    ``initial`` (B_0 > 0): a number -> float, or a tensor of per-prompt budgets -> tensor of its shape (float64 for
    float64 input, else float32). gamma in (0, 1] (1 = constant budget), minimum (B_min) >= 1, k > 0, step >= 0,
    total_steps >= 1. The budget is not rounded: floor it (plus a margin) for max_new_tokens.
    """
    if variant not in BUDGET_VARIANTS:
        raise ValueError(f"variant must be one of {BUDGET_VARIANTS}, got {variant!r}")
    g = _in_range(gamma, "gamma", 0.0, 1.0, low_open=True)
    b_min = _in_range(minimum, "minimum", 1.0, math.inf, high_open=True)
    k = _in_range(k, "k", 0.0, math.inf, low_open=True, high_open=True)
    t, big_t = _clamped_steps(step, total_steps)
    exponent = (t / big_t) ** k if variant == "ratio_pow" else t / big_t**k
    decay = g**exponent
    if isinstance(initial, torch.Tensor):
        b0 = _float_tensor(initial)
        if not bool(((b0 > 0) & torch.isfinite(b0)).all()):
            raise ValueError("initial budgets must be finite and > 0")
        return (b0 * decay).clamp(min=b_min)
    b0 = _in_range(initial, "initial", 0.0, math.inf, low_open=True, high_open=True)
    return max(b_min, b0 * decay)


def budget_length_reward(lengths: Numeric, budget: float | torch.Tensor, *, shape: str = "rise_fall") -> torch.Tensor:
    """RMT triangular length reward r_len(l; B) in [0, 1] ([N] float; algorithms.md 3.1, piecewise form [INF]).

        "rise_fall":  r = l / B              for l <= B
                        = max(0, 2 - l / B)    for B < l <= 2B
                        = 0                    for l > 2B
        "peak":       r = max(0, 1 - |l - B| / B)

    The paper [3P] only says the reward is "triangular" (its piecewise form was cut off in the source); both readings
    are ours. As specified (slope 1/B on both sides) they are the same function: 1 - (B - l)/B = l/B for l <= B and
    1 - (l - B)/B = 2 - l/B above; "peak" is kept as a name so configs written for either reading work.
    ``budget``: a number or a per-row [N] tensor, > 0.
    """
    if shape not in LENGTH_REWARD_SHAPES:
        raise ValueError(f"shape must be one of {LENGTH_REWARD_SHAPES}, got {shape!r}")
    length = _lengths(lengths)
    b = _per_row(budget, "budget", length)
    if not bool(((b > 0) & torch.isfinite(b)).all()):
        raise ValueError("budget must be finite and > 0")
    ratio = length / b
    if shape == "peak":
        return (1.0 - (length - b).abs() / b).clamp(min=0.0)
    return torch.where(ratio <= 1.0, ratio, (2.0 - ratio).clamp(min=0.0))


def combine_length_reward(
    correct: Numeric, length_reward: Numeric, *, mode: str = "additive", weight: float = 0.5,
    only_when_correct: bool = True,
) -> torch.Tensor:
    """Total RMT reward from the correctness (prefix-match) reward c and r_len ([N]; algorithms.md 3.1, [INF]).

        additive:        r = c + weight * r_len * m,   m = 1[c > 0] if only_when_correct else 1
        multiplicative:  r = c * r_len                 (weight and only_when_correct play no part)

    ``correct``: bool or numeric [N] (bool -> 0/1; a row counts as correct where c > 0). weight >= 0.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"mode must be one of {COMBINE_MODES}, got {mode!r}")
    w = _in_range(weight, "weight", 0.0, math.inf, high_open=True)
    r_len = _vector(length_reward, "length_reward")
    c = _correct_values(correct, r_len)
    if mode == "multiplicative":
        return c * r_len
    if only_when_correct:
        r_len = torch.where(c > 0, r_len, torch.zeros_like(r_len))
    return c + w * r_len


def correct_length_budget(
    lengths: Numeric, correct: Numeric, group_size: int, *, quantile: float = 1.0, fallback: float
) -> torch.Tensor:
    """Per-group budget from the lengths of the group's correct completions ([P] float) [INF].

        B_g = Quantile_q({l_i : i in g, c_i > 0})   (linear interpolation, as torch.quantile; q = 1 -> max)
            = fallback                              if group g has no correct completion

    quantile in [0, 1]; fallback finite and > 0 (it is used as a budget).
    """
    q = _in_range(quantile, "quantile", 0.0, 1.0)
    fb = _in_range(fallback, "fallback", 0.0, math.inf, low_open=True, high_open=True)
    length = _lengths(lengths)
    ok = _correct_values(correct, length) > 0
    groups = _num_groups(length.numel(), group_size)
    if groups == 0:
        return length.new_zeros(0)
    vals = torch.where(ok, length.double(), torch.full_like(length, math.nan, dtype=torch.float64))
    per_group = torch.nanquantile(vals.view(groups, -1), q, dim=1)  # all-NaN row (no correct) -> NaN
    return torch.where(torch.isnan(per_group), torch.full_like(per_group, fb), per_group).to(length.dtype)


# ------------------------------------------------------------------------------------------------ e1 effort control (5)
def effort_reward(
    correct: Numeric, think_lengths: Numeric, effort: Numeric, mean_length: Numeric, *, band: float = 0.0,
    truncated: Numeric | None = None,
) -> torch.Tensor:
    """e1 adaptive-effort reward R_AEC ([N] float; algorithms.md 5).

        R = c * g(l),   with r the effort, T the mean think length and tau = r * T
        band = 0 (paper [ABS]):  g = 1[l <= tau]
        band > 0 (smooth [INF]): g = 1                                  for l <= tau
                                   = ((r + band) * T - l) / (band * T)  for tau < l <= (r + band) * T
                                   = 0                                  beyond
        R = 0 where truncated (no </think>: the thinking never ended) [INF].

    effort and mean_length: numbers or per-row [N] tensors (broadcast from the prompt); effort in (0, 1], mean_length
    finite and >= 0 (T = 0 rewards only l = 0). ``correct``: bool or numeric [N]; band finite and >= 0.
    """
    bw = _in_range(band, "band", 0.0, math.inf, high_open=True)
    length = _lengths(think_lengths, "think_lengths")
    c = _correct_values(correct, length)
    r = _per_row(effort, "effort", length)
    if not bool(((r > 0) & (r <= 1)).all()):
        raise ValueError("effort must be in (0, 1]")
    mean = _per_row(mean_length, "mean_length", length)
    if not bool(((mean >= 0) & torch.isfinite(mean)).all()):
        raise ValueError("mean_length must be finite and >= 0")
    inside = length <= r * mean
    if bw == 0.0:
        gate = inside.to(length.dtype)
    else:
        ramp = (((r + bw) * mean - length) / (bw * mean)).clamp(0.0, 1.0)  # mean = 0: -inf -> 0 (or NaN, unused)
        gate = torch.where(inside, torch.ones_like(ramp), ramp)
    reward = c * gate
    return torch.where(_bool_rows(truncated, "truncated", length), torch.zeros_like(reward), reward)


def group_mean_length(
    lengths: Numeric, group_size: int, *, truncated: Numeric | None = None, cap: float | None = None
) -> torch.Tensor:
    """e1 per-prompt mean think length T of the current group's rollouts ([P] float; definition [INF]).

        T_g = mean of l_i over the rows i of group g that are not truncated
            = cap   if every row of group g is truncated

    Truncated rows are left out of the mean: their think length is cut at the generation limit, not a finished chain.
    ``cap`` (finite, > 0) is needed only when some group is fully truncated; otherwise that is a ValueError.
    """
    length = _lengths(lengths)
    groups = _num_groups(length.numel(), group_size)
    keep = ~_bool_rows(truncated, "truncated", length)
    if cap is not None:
        cap = _in_range(cap, "cap", 0.0, math.inf, low_open=True, high_open=True)
    kept = keep.view(groups, -1)
    count = kept.sum(-1)
    total = torch.where(kept, length.view(groups, -1), torch.zeros_like(length.view(groups, -1))).sum(-1)
    empty = count == 0
    if bool(empty.any()) and cap is None:
        raise ValueError("a group has all rows truncated; pass cap (its mean length)")
    mean = total / count.clamp(min=1)
    return torch.where(empty, torch.full_like(mean, cap if cap is not None else 0.0), mean)


class PromptLengthTracker:
    """Per-prompt exponential moving average of the mean think length across epochs (e1 T alternative [INF]).

        m_key <- v                                   first update of key
        m_key <- decay * m_key + (1 - decay) * v     afterwards

    Keys are strings (prompt text or a string id; anything else is a TypeError) so `state_dict` is JSON-serialisable. Within one `update`, a
    repeated key is applied in order. `load_state_dict` restores the means; ``decay`` stays the constructor's (the
    stored value is informational), so a resumed run follows its own configuration.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = _in_range(decay, "decay", 0.0, 1.0, high_open=True)
        self._means: dict[str, float] = {}

    def update(self, keys: Sequence[str], values: Sequence[float]) -> None:
        keys, values = list(keys), [_real(v, "values") for v in values]
        if len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys but {len(values)} values")
        for key, value in zip(keys, values):
            if not isinstance(key, str):
                raise TypeError(f"keys must be strings, got {key!r}")
            if math.isinf(value):
                raise ValueError(f"values must be finite, got {value}")
        for key, value in zip(keys, values):
            old = self._means.get(key)
            self._means[key] = value if old is None else self.decay * old + (1.0 - self.decay) * value

    def get(self, key: str, default: float | None = None) -> float | None:
        return self._means.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._means

    def __len__(self) -> int:
        return len(self._means)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "means": dict(self._means)}

    def load_state_dict(self, state: dict) -> None:
        means = state.get("means") if isinstance(state, dict) else None
        if not isinstance(means, dict):
            raise TypeError("state must be a dict with a 'means' dict")
        loaded = {}
        for key, value in means.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings, got {key!r}")
            v = _real(value, f"means[{key!r}]")
            if math.isinf(v):
                raise ValueError(f"means[{key!r}] must be finite, got {value}")
            loaded[key] = v
        self._means = loaded


# ------------------------------------------------------------------------------------------------ DRQA (4)
def concise_correct_reward(correct: Numeric, lengths: Numeric, ref_lengths: Numeric, *, lam: float = 0.5) -> torch.Tensor:
    """DRQA generation-side concise-correct reward ([N] float; the whole form is [INF], algorithms.md 4).

        r = c * (1 + lam * max(0, 1 - l / l_ref))   where l_ref > 0 (l_ref: the same question's batch-mode CoT length)
          = c                                       where l_ref <= 0 or NaN (no reference)

    ``correct``: bool or numeric [N]; ref_lengths a number or [N] (NaN allowed, +inf not); lam >= 0.
    """
    lam = _in_range(lam, "lam", 0.0, math.inf, high_open=True)
    length = _lengths(lengths)
    c = _correct_values(correct, length)
    ref = _per_row(ref_lengths, "ref_lengths", length, allow_nan=True)
    if bool((ref == math.inf).any()):
        raise ValueError("ref_lengths must not be +inf")
    has_ref = ref > 0  # False for NaN
    safe_ref = torch.where(has_ref, ref, torch.ones_like(ref))
    bonus = (1.0 - length / safe_ref).clamp(min=0.0)
    return c * (1.0 + lam * torch.where(has_ref, bonus, torch.zeros_like(bonus)))


# ------------------------------------------------------------------------------------------------ RMT curriculum (3.2)
def curriculum_target(progress: float, *, start: float = 0.2, end: float = 0.9) -> float:
    """Target entropy quantile mu_t = (1 - p) * start + p * end, p = progress clamped to [0, 1] ([INF], 3.2).

    start, end in [0, 1] (easy -> hard means start < end, but any pair is accepted).
    """
    p = min(max(_real(progress, "progress"), 0.0), 1.0)
    return _lerp(_in_range(start, "start", 0.0, 1.0), _in_range(end, "end", 0.0, 1.0), p)


def entropy_quantiles(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Quantile rank q in [0, 1] of each masked token's entropy among all masked tokens of the batch (3.2, [INF]).

        q_j = rank_j / (M - 1),   rank_j = #{i : H_i < H_j} + (#{i : H_i = H_j} - 1) / 2   (0-based, ties averaged)

    over the M masked tokens; 0 = lowest entropy, 1 = highest. Unmasked positions get 0 (and may hold NaN). M = 1 gives
    0.5 (a single token is a full tie, like M equal entropies). Same shape as ``entropy``; float64 for float64 input.
    """
    m = _mask_like(mask, entropy)
    out = torch.zeros_like(entropy, dtype=torch.float64 if entropy.dtype == torch.float64 else torch.float32)
    vals = entropy[m].double()
    if bool(torch.isnan(vals).any()):
        raise ValueError("entropy must not be NaN at masked positions")
    count = vals.numel()
    if count == 0:
        return out
    ordered = torch.sort(vals).values
    below = torch.searchsorted(ordered, vals, right=False)
    below_or_equal = torch.searchsorted(ordered, vals, right=True)
    rank = (below + below_or_equal - 1).double() / 2.0
    out[m] = (rank / (count - 1) if count > 1 else torch.full_like(rank, 0.5)).to(out.dtype)
    return out


def _mask_like(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != shape {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def _curriculum_log_weights(quantiles, mask, progress, start, end, width) -> tuple[torch.Tensor, torch.Tensor]:
    """(log w on all positions, bool mask); log w = -(q - mu_t)^2 / (2 width^2)."""
    s = _in_range(width, "width", 0.0, math.inf, low_open=True, high_open=True)
    mu = curriculum_target(progress, start=start, end=end)
    m = _mask_like(mask, quantiles)
    q = torch.where(m, quantiles, torch.full_like(quantiles, mu))  # unmasked (maybe NaN) -> harmless value
    if bool(torch.isnan(q).any()):
        raise ValueError("quantiles must not be NaN at masked positions")
    return -((q - mu) ** 2) / (2.0 * s * s), m


def curriculum_weights(
    quantiles: torch.Tensor, mask: torch.Tensor, progress: float, *, start: float = 0.2, end: float = 0.9,
    width: float = 0.15,
) -> torch.Tensor:
    """RMT curriculum sampling weight per token ([INF] form, algorithms.md 3.2).

        w = exp(-(q - mu_t)^2 / (2 width^2)) on masked tokens, 0 elsewhere;   mu_t = curriculum_target(progress)

    Unnormalised (max 1, at q = mu_t). width > 0.
    """
    log_w, m = _curriculum_log_weights(quantiles, mask, progress, start, end, width)
    return torch.where(m, log_w.exp(), torch.zeros_like(log_w))


def select_curriculum_tokens(
    entropy: torch.Tensor, mask: torch.Tensor, progress: float, *, fraction: float, start: float = 0.2,
    end: float = 0.9, width: float = 0.15, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Curriculum choice of RL target tokens: bool mask of the shape of ``entropy`` ([INF], algorithms.md 3.2).

    Keeps k = max(1, floor(fraction * M + 1/2)) of the M masked tokens (k = 0 when M = 0), sampled without replacement
    with probability proportional to `curriculum_weights` of their `entropy_quantiles` (torch.multinomial with
    ``generator``, which must live on entropy's device). fraction in (0, 1]; fraction = 1 keeps every masked token
    without sampling. Weights are computed relative to the largest one and floored at the smallest positive float, so
    a very small width still samples (the nearest tokens first) instead of failing on all-zero weights.
    """
    f = _in_range(fraction, "fraction", 0.0, 1.0, low_open=True)
    m = _mask_like(mask, entropy)
    count = int(m.sum())
    keep = 0 if count == 0 else max(1, math.floor(f * count + 0.5))
    if keep >= count:
        return m.clone()
    q = entropy_quantiles(entropy, m).double()
    log_w, _ = _curriculum_log_weights(q, m, progress, start, end, width)
    log_w = log_w[m]
    probs = (log_w - log_w.max()).exp().clamp(min=torch.finfo(torch.float64).tiny)
    chosen = torch.multinomial(probs, keep, replacement=False, generator=generator)
    picked = torch.zeros(count, dtype=torch.bool, device=m.device)
    picked[chosen] = True
    out = torch.zeros_like(m)
    out[m] = picked
    return out


# ------------------------------------------------------------------------------------------------ RMT dual loss (3.3)
def dual_loss(rl_loss, ntp_loss, *, rl_weight: float = 1.0, ntp_weight: float = 1.0):
    """RMT dual objective L = rl_weight * L_RL + ntp_weight * L_NTP ([ABS] form; weights [INF], default 1 and 1).

    A zero-weighted term is left out rather than multiplied by 0, so ntp_weight = 0 returns exactly rl_weight * L_RL
    (even if L_NTP is NaN) and rl_weight = 0 exactly ntp_weight * L_NTP. Weights finite, >= 0, not both 0.
    """
    a = _in_range(rl_weight, "rl_weight", 0.0, math.inf, high_open=True)
    b = _in_range(ntp_weight, "ntp_weight", 0.0, math.inf, high_open=True)
    if a == 0.0 and b == 0.0:
        raise ValueError("rl_weight and ntp_weight must not both be 0")
    if b == 0.0:
        return a * rl_loss
    if a == 0.0:
        return b * ntp_loss
    return a * rl_loss + b * ntp_loss


def ntp_token_loss(logp: torch.Tensor, mask: torch.Tensor, *, num_tokens=None) -> torch.Tensor:
    """Token-mean next-token NLL over the mask: L_NTP = -sum_{i,t} m_{i,t} logp_{i,t} / max(1, n)  (0-d tensor).

    logp: [N, T] log-probabilities of the actual next tokens. Unmasked positions are ignored even if NaN/inf; an empty
    mask gives 0 (still attached to the graph). n: `num_tokens` when given (the masked tokens of the whole step, over
    every micro-batch and rank, so that the micro-batch losses add up to the step's), else sum m.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D [N, T], got shape {tuple(logp.shape)}")
    m = _mask_like(mask, logp)
    nll = torch.where(m, -logp, torch.zeros_like(logp))
    n = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=nll.dtype, device=nll.device)
    return nll.sum() / n.clamp(min=1)


def linear_schedule(step, total_steps, *, start: float, end: float) -> float:
    """Linear ramp v_t = (1 - p) * start + p * end, p = min(t / T, 1): exactly start at t = 0 and end for t >= T.

    For the NTP weight (or any other scalar schedule). step >= 0, total_steps >= 1; start, end finite.
    """
    t, big_t = _clamped_steps(step, total_steps)
    a = _in_range(start, "start", -math.inf, math.inf, low_open=True, high_open=True)
    b = _in_range(end, "end", -math.inf, math.inf, low_open=True, high_open=True)
    return _lerp(a, b, t / big_t)
