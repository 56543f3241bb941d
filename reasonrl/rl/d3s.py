"""D³S: dynamic dual-level down-sampling (rollouts by max advantage variance, tokens by |A|·H).

Rows are grouped contiguously (N = P * G), as in `reasonrl.rl.advantages`. Everything here is a pure function of
tensors/numbers; the trainer forms the token scores s_{i,t} = |A_{i,t}| * H_{i,t} (H: entropy under pi_old),
applies the returned masks and normalizes the token-mean loss by the number of *selected* tokens.
"""

from __future__ import annotations

import math

import torch

from reasonrl.rl.checks import as_int

SAMPLE_SCOPES = ("intra", "cross")
TOKEN_SCOPES = ("batch", "sequence")
SCHEDULE_SHAPES = ("linear", "cosine", "step")

# Candidates whose k^2 * variance is within this fraction of k * sum(x^2) of the best are treated as tied
# (float64 rounding of the prefix sums is ~1e-16 of that scale, so mathematically equal candidates always tie).
_TIE_RTOL = 1e-10


def _check_fraction(keep_fraction: float, name: str = "keep_fraction") -> float:
    f = float(keep_fraction)
    if not (0.0 < f <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {keep_fraction}")
    return f


def _max_variance_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise exact max-variance k-subset. values: [R, n] float64 without NaN; returns bool [R, n].

    Sort each row ascending (stable: equal values ordered by index). Candidate j in [0, k] keeps the j largest and
    the k - j smallest sorted values; with prefix sums P (of x) and Q (of x^2), P[0] = Q[0] = 0,
      S_j = P[k-j] + P[n] - P[n-j],   T_j = Q[k-j] + Q[n] - Q[n-j],
      k^2 * Var_j = k * T_j - S_j^2.
    The smallest j among the (tolerance-)maximal candidates wins.
    """
    rows, n = values.shape
    order = torch.sort(values, dim=1, stable=True).indices
    s = values.gather(1, order)
    s = s - s.mean(dim=1, keepdim=True)  # variance is shift invariant; centering limits cancellation
    zero = s.new_zeros(rows, 1)
    p = torch.cat([zero, s.cumsum(1)], dim=1)
    q = torch.cat([zero, (s * s).cumsum(1)], dim=1)
    j = torch.arange(k + 1, device=values.device)
    lo, hi = (k - j).expand(rows, -1), (n - j).expand(rows, -1)
    sums = p.gather(1, lo) + p[:, n : n + 1] - p.gather(1, hi)
    sq = q.gather(1, lo) + q[:, n : n + 1] - q.gather(1, hi)
    score = k * sq - sums * sums
    best = score.max(dim=1, keepdim=True).values
    tol = _TIE_RTOL * k * q[:, n : n + 1]
    tied = score >= best - tol
    j_star = torch.where(tied, j, k + 1).min(dim=1, keepdim=True).values  # smallest tied j
    pos = torch.arange(n, device=values.device).expand(rows, -1)
    keep_sorted = (pos < k - j_star) | (pos >= n - j_star)
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def max_variance_subset(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending, int64) of a k-subset of ``values`` with the largest population variance.

    Var(S) = (1/k) sum_{i in S} x_i^2 - ((1/k) sum_{i in S} x_i)^2. The optimum is always the j largest plus the
    k - j smallest values for some j in [0, k] (PODS, arXiv 2504.13818); all k + 1 candidates are scored with
    prefix sums of x and x^2 after one sort, O(n log n).

    Deterministic tie-breaking: (1) equal values are ordered by index, so a "smallest" pick prefers the lower index
    and a "largest" pick the higher index; (2) among candidates with the same variance the smallest j (fewest
    values from the top) wins; e.g. a constant input keeps its first k entries.
    """
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [n], got shape {tuple(values.shape)}")
    n = values.numel()
    k = as_int(k, "k", 0, n)
    v = values.detach().to(torch.float64)
    if torch.isnan(v).any():
        raise ValueError("values contain NaN")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    return _max_variance_mask(v[None], k)[0].nonzero().squeeze(-1)


def select_rollouts(
    advantages: torch.Tensor,
    *,
    group_size: int,
    keep_fraction: float,
    scope: str = "intra",
    min_keep: int = 2,
) -> torch.Tensor:
    """Sample-level D³S: bool [N], True for the rollouts to train on.

    scope="intra" (D³S-I): every group keeps k = min(G, max(min_keep, ceil(rho * G))) rows maximizing the
    population variance of their (original, full-group) advantages.
    scope="cross" (D³S): the N rows are pooled and K = min(N, max(min_keep, ceil(rho * N))) rows maximizing the
    variance of the pooled advantages are kept; since advantages are group-centered, near-zero rows (and so
    zero-variance groups) go first.

    A group whose advantages are all equal (e.g. all 0) still keeps k rows under "intra" (its first k rows, by the
    tie-breaking of ``max_variance_subset``), so every group keeps the same count; such rows carry no policy-gradient
    signal and the trainer skips A = 0 rows anyway. keep_fraction == 1 returns all True (identity).
    ceil uses a 1e-9 slack, so rho * G that is an integer up to float rounding is not rounded up.
    """
    if scope not in SAMPLE_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SAMPLE_SCOPES}")
    rho = _check_fraction(keep_fraction)
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [N], got shape {tuple(advantages.shape)}")
    group_size = as_int(group_size, "group_size", 1)
    min_keep = as_int(min_keep, "min_keep", 1)
    n = advantages.numel()
    if n % group_size != 0:
        raise ValueError(f"number of advantages ({n}) is not divisible by group_size ({group_size})")
    a = advantages.detach().to(torch.float64)
    if torch.isnan(a).any():
        raise ValueError("advantages contain NaN")
    if rho == 1.0 or n == 0:
        return torch.ones(n, dtype=torch.bool, device=advantages.device)
    rows = a.view(-1, group_size) if scope == "intra" else a.view(1, -1)
    width = rows.shape[1]
    k = min(width, max(min_keep, _ceil(rho * width)))
    if k == width:
        return torch.ones(n, dtype=torch.bool, device=advantages.device)
    return _max_variance_mask(rows, k).reshape(-1)


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def _valid_scores(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [N, T], got shape {tuple(scores.shape)}")
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != scores shape {tuple(scores.shape)}")
    m = mask.to(device=scores.device, dtype=torch.bool)
    valid = scores[m]
    if valid.numel() and not bool(((valid >= 0) & torch.isfinite(valid)).all()):
        raise ValueError("scores must be finite and >= 0 on valid tokens (s = |A| * H)")
    return valid, m


def token_score_threshold(valid_scores: torch.Tensor, keep_fraction: float) -> float:
    """The k-th largest valid score, k = ceil(rho * n_valid): the cut for a batch-level token selection.

    Multi-rank use: gather the valid scores of every rank, call this once, apply ``tokens_at_or_above`` locally.
    Special values: -inf when keep_fraction == 1 (keep every valid token, zero scores included), +inf when there is
    no valid score (keep nothing).
    """
    rho = _check_fraction(keep_fraction)
    if valid_scores.dim() != 1:
        raise ValueError(f"valid_scores must be 1-D, got shape {tuple(valid_scores.shape)}")
    if rho == 1.0:
        return float("-inf")
    n = valid_scores.numel()
    if n == 0:
        return float("inf")
    if not bool(((valid_scores >= 0) & torch.isfinite(valid_scores)).all()):
        raise ValueError("valid_scores must be finite and >= 0 (s = |A| * H)")
    k = min(n, _ceil(rho * n))
    return float(torch.topk(valid_scores.detach().flatten(), k).values[-1])


def tokens_at_or_above(scores: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [N, T]: mask & (s >= threshold) & (s > 0); threshold == -inf returns the mask unchanged.

    Every token tied with the threshold is kept, so slightly more than ceil(rho * n_valid) tokens may survive;
    tokens with s = 0 (A = 0 or H = 0) are never kept unless threshold == -inf.
    """
    _, m = _valid_scores(scores, mask)
    thr = float(threshold)
    if math.isnan(thr):
        raise ValueError("threshold is NaN")
    if thr == float("-inf"):
        return m.clone()
    return m & (scores >= thr) & (scores > 0)


def select_tokens(scores: torch.Tensor, mask: torch.Tensor, *, keep_fraction: float, scope: str = "batch") -> torch.Tensor:
    """Token-level D³S: bool [N, T], the valid tokens with the highest scores s = |A| * H.

    scope="batch": keep the valid tokens with s >= the k-th largest valid score, k = ceil(rho * n_valid) over the
    whole [N, T] (identical to ``tokens_at_or_above(scores, mask, token_score_threshold(scores[mask], rho))``).
    scope="sequence": the same cut per row, k_i = ceil(rho * n_valid_i).
    Ties at the cut are all kept; zero scores are never kept; keep_fraction == 1 returns ``mask`` (as bool).
    Padding columns (mask False) never change the result. ceil(x) is taken as ceil(x - 1e-9) everywhere, so a
    product rho * n that is an integer up to float rounding is not rounded up.
    """
    if scope not in TOKEN_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {TOKEN_SCOPES}")
    rho = _check_fraction(keep_fraction)
    valid, m = _valid_scores(scores, mask)
    if rho == 1.0:
        return m.clone()
    if scope == "batch":
        return tokens_at_or_above(scores, m, token_score_threshold(valid, rho))
    if scores.shape[1] == 0:
        return m.clone()
    counts = m.sum(dim=1, keepdim=True)
    ks = torch.ceil(counts.to(torch.float64) * rho - 1e-9).long().clamp(min=1)  # <= counts when counts >= 1
    ranked = torch.where(m, scores, torch.full_like(scores, float("-inf"))).sort(dim=1, descending=True).values
    thr = ranked.gather(1, ks - 1)
    thr = torch.where(counts > 0, thr, torch.full_like(thr, float("inf")))  # rows without valid tokens keep none
    return m & (scores >= thr) & (scores > 0)


def keep_fraction_at(
    step: int,
    total_steps: int,
    *,
    start: float,
    end: float = 1.0,
    ramp_fraction: float = 0.5,
    shape: str = "linear",
) -> float:
    """Scheduled keep fraction rho(step): ``start`` at step 0, ``end`` from step R = ramp_fraction * total_steps on.

    With p = min(1, step / R) (p = 1 when R == 0):
      linear: rho = start + (end - start) * p
      cosine: rho = start + (end - start) * (1 - cos(pi * p)) / 2
      step:   rho = start for step < R, end afterwards (one jump at the end of the ramp).
    Monotone between the endpoints (non-decreasing when end >= start, the D³S curriculum).
    """
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SCHEDULE_SHAPES}")
    start_f = _check_fraction(start, "start")
    end_f = _check_fraction(end, "end")
    total_steps = as_int(total_steps, "total_steps", 1)
    if not (step >= 0):
        raise ValueError(f"step must be >= 0, got {step}")
    if not (0.0 <= ramp_fraction <= 1.0):
        raise ValueError(f"ramp_fraction must be in [0, 1], got {ramp_fraction}")
    ramp = ramp_fraction * total_steps
    p = 1.0 if ramp == 0 else min(1.0, step / ramp)
    if shape == "linear":
        w = p
    elif shape == "cosine":
        w = 0.5 * (1.0 - math.cos(math.pi * p))
    else:
        w = 1.0 if p >= 1.0 else 0.0
    return start_f + (end_f - start_f) * w
