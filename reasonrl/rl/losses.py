"""Token log-probs, PPO/GRPO clipped surrogate (clip-higher, per-token bounds, dual clip), KL estimators, and
loss/entropy aggregation normalized by global counts (additive over micro-batches)."""

import torch

# Rows of logits per chunk: 32 x a 49K vocabulary is ~6 MB of float32, which stays in the last-level cache through
# the few passes over a chunk. 1024-row chunks (200 MB) ran the forward + backward 6x slower on a 2-core CPU
# (scripts/bench_train.py; a [4096, 49152] batch: 5.0 s -> 0.8 s).
LOGPROB_CHUNK_ROWS = 32


class _ChunkedLogpEntropy(torch.autograd.Function):
    """logp_t = log_softmax(z)[y_t], H_t = -sum_v p_v log p_v with z = logits / tau,
    computed over chunks of rows; backward recomputes each chunk:
    dlogp/dz = onehot(y) - p,  dH/dz = -p * (log p + H). An output nobody differentiates (the entropy when it is
    only a metric) costs nothing in backward."""

    @staticmethod
    def forward(ctx, logits2d, targets1d, chunk_size, temperature):
        n = logits2d.shape[0]
        cdt = torch.promote_types(logits2d.dtype, torch.float32)
        logp = logits2d.new_empty(n, dtype=cdt)
        ent = logits2d.new_empty(n, dtype=cdt)
        for s in range(0, n, chunk_size):
            lsm = torch.log_softmax(_scaled(logits2d[s : s + chunk_size], cdt, temperature), dim=-1)
            logp[s : s + chunk_size] = lsm.gather(-1, targets1d[s : s + chunk_size, None]).squeeze(-1)
            ent[s : s + chunk_size] = -(lsm.exp() * lsm).sum(-1)
        ctx.save_for_backward(logits2d, targets1d, ent)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None instead of a tensor of zeros
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits2d, targets1d, ent = ctx.saved_tensors
        cs, tau = ctx.chunk_size, ctx.temperature
        grad = torch.empty_like(logits2d)
        cdt = ent.dtype
        for s in range(0, logits2d.shape[0], cs):
            lsm = torch.log_softmax(_scaled(logits2d[s : s + cs], cdt, tau), dim=-1)
            p = lsm.exp()
            if g_ent is not None:  # -g_H * p * (log p + H), then the log-prob term on top
                g = (lsm + ent[s : s + cs, None]).mul_(p).mul_(-g_ent[s : s + cs, None].to(cdt))
                if g_logp is not None:
                    g.sub_(p.mul_(g_logp[s : s + cs, None].to(cdt)))
            elif g_logp is not None:
                g = p.mul_(-g_logp[s : s + cs, None].to(cdt))
            else:
                g = torch.zeros_like(lsm)
            if g_logp is not None:
                g.scatter_add_(-1, targets1d[s : s + cs, None], g_logp[s : s + cs, None].to(cdt))
            grad[s : s + cs] = g if tau == 1.0 else g.div_(tau)
        return grad, None, None, None


def _scaled(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """logits / temperature in `dtype` (float32 at least), without a pass for temperature 1."""
    z = logits.to(dtype)
    return z if temperature == 1.0 else z / temperature


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = LOGPROB_CHUNK_ROWS,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[b,t] = log_softmax(logits/tau)[b,t,targets[b,t]], entropy = -sum p log p
    (float32, or float64 for float64 logits).

    Works on [B*T, V] in chunks of ``chunk_size`` rows, so at most one chunk's
    float32 log-softmax exists at a time (forward and backward)."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B,T,V] and targets [B,T], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, v = logits.shape
    logp, ent = _ChunkedLogpEntropy.apply(
        logits.reshape(b * t, v), targets.reshape(b * t).long(), int(chunk_size), float(temperature)
    )
    return logp.view(b, t), ent.view(b, t)


KL_ESTIMATORS = ("k1", "k2", "k3")
# Log-ratios are clamped to [-20, 20] before exp (as verl): exp(89) is inf in float32, and the backward of a clipped
# token then multiplies that inf by 0 (NaN). Beyond the clamp the ratio saturates at e^±20 and has no gradient.
LOG_RATIO_CLAMP = 20.0
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "constant")

_Number = float | int | torch.Tensor


def _bound(eps: float | torch.Tensor, name: str, like: torch.Tensor) -> float | torch.Tensor:
    """Validates a clip epsilon (python number or [N,T] tensor); tensors come back detached, in float64."""
    if isinstance(eps, torch.Tensor):
        if eps.shape != like.shape:
            raise ValueError(f"{name} tensor must have the shape of logp {tuple(like.shape)}, got {tuple(eps.shape)}")
        if not eps.is_floating_point():
            raise ValueError(f"{name} tensor must be floating point, got {eps.dtype}")
        if not bool((eps >= 0).all()):
            raise ValueError(f"{name} must be >= 0 everywhere (and not NaN)")
        return eps.detach().to(torch.float64)
    if not eps >= 0:
        raise ValueError(f"{name} must be >= 0, got {eps}")
    return eps


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """r = exp(clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)): the PPO ratio, finite for any finite
    log-probs (and with a finite gradient, 0 where the clamp is active)."""
    return torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float | torch.Tensor = 0.2,
    eps_high: float | torch.Tensor = 0.2,
    mask: torch.Tensor | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss [N,T]:

        r = exp(clamp(logp - old_logp, -20, 20))      (`policy_ratio`; the clamp keeps loss and gradient finite)
        ℓ = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) = max(-A r, -A clip(r))
        dual clip (dual_clip = c > 1), only where A < 0:  ℓ = min(max(-A r, -A clip(r)), -A c)

    so a negative-advantage token's loss is capped at -A c (no gradient once r > c). This equals verl's
    `clip_ratio_c` and TRL's `delta` (r <- min(r, delta)) whenever c >= 1 + eps_high.

    ``eps_low`` / ``eps_high`` are python numbers or [N,T] tensors of per-token bounds (HAPO's adaptive clipping).
    Tensor bounds are treated as constants (detached) and ``1 - eps`` / ``1 + eps`` are formed in float64 before
    the cast to logp's dtype, so constant tensors reproduce float bounds exactly. ``advantages`` is [N] or [N,T].

    Metrics (0-dim, detached, over valid tokens of ``mask``): clip/low_frac = frac(r < 1-eps_low and A < 0),
    clip/high_frac = frac(r > 1+eps_high and A > 0), clip/dual_frac = frac(A < 0 and the dual cap is active);
    clip/dual_frac is 0 when ``dual_clip`` is None."""
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"logp and old_logp must both be [N,T], got {tuple(logp.shape)} and {tuple(old_logp.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages [N] has N={advantages.shape[0]}, logp has N={logp.shape[0]}")
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [N] or [N,T], got {tuple(advantages.shape)}")
    low = _bound(eps_low, "eps_low", logp)
    high = _bound(eps_high, "eps_high", logp)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip}")
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    elif mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    lower = (1.0 - low).to(logp.device, logp.dtype) if isinstance(low, torch.Tensor) else 1.0 - low
    upper = (1.0 + high).to(logp.device, logp.dtype) if isinstance(high, torch.Tensor) else 1.0 + high
    adv = advantages.to(logp.dtype)
    ratio = policy_ratio(logp, old_logp)
    clipped = ratio.clamp(lower, upper)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    dual = None
    if dual_clip is not None:
        cap = -adv * dual_clip
        negative = adv < 0
        dual = negative & (loss > cap)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    with torch.no_grad():
        m = mask.bool()
        denom = m.sum().clamp(min=1).float()
        low_frac = ((ratio < lower) & (adv < 0) & m).sum() / denom
        high_frac = ((ratio > upper) & (adv > 0) & m).sum() / denom
        dual_frac = (dual & m).sum() / denom if dual is not None else torch.zeros((), device=logp.device)
    return loss, {
        "clip/low_frac": low_frac.detach(),
        "clip/high_frac": high_frac.detach(),
        "clip/dual_frac": dual_frac.detach(),
    }


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref): exp(d) - d - 1 (>= 0), d = clamp(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    (as verl's low_var_kl, so exp never overflows; no gradient where the clamp is active)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"shape mismatch: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimator of KL(pi || ref) from the sampled token's log-probs (Schulman's k1/k2/k3), with
    x = logp - ref_logp:

        k1 = x                       (unbiased, can be negative; verl "kl")
        k2 = x^2 / 2                 (verl "mse"; its gradient is the gradient of KL)
        k3 = exp(-x) + x - 1 >= 0    (unbiased, low variance; TRL's beta term, verl "low_var_kl")

    k3 clamps x to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp, as verl does (TRL does not clamp; equal to TRL for
    |x| <= 20); verl's further clamp of the k3 value to [-10, 10] is not applied. k1 and k2 do not exponentiate."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"shape mismatch: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    if kind == "k3":
        return k3_kl(logp, ref_logp)
    x = logp - ref_logp
    return x if kind == "k1" else 0.5 * x * x


def _positive(value, name: str, mode: str):
    if value is None:
        raise ValueError(f"{name} is required for mode {mode!r}")
    if not isinstance(value, torch.Tensor) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    num_tokens: _Number | None,
    num_sequences: _Number | None = None,
    norm_constant: _Number | None = None,
) -> torch.Tensor:
    """Scalar loss of a micro-batch, normalized by GLOBAL counts of the optimizer step so that the sum over any
    split of the rows into micro-batches (and ranks) equals the value on the whole batch. With m the mask,
    n_i = sum_t m_it, K = num_tokens (valid tokens in the step), S = num_sequences, C = norm_constant:

        "token_mean":              sum_it m l / K                     DAPO, TRL "dapo", verl token-mean (global K)
        "seq_mean_token_mean":     sum_i [sum_t m l / max(1, n_i)] / S    TRL "grpo", verl seq-mean-token-mean
        "seq_mean_token_sum_norm": sum_it m l / C                     verl seq-mean-token-sum-norm (C =
                                   loss_scale_factor, e.g. max response length); verl does NOT divide by the
                                   number of sequences, so this is S times "constant"
        "constant":                sum_it m l / (S C)                 Dr. GRPO, TRL "dr_grpo" (C = max completion
                                   length)

    K and S count the whole optimizer step (all micro-batches and ranks), including rows the trainer skips
    because A = 0. S is the number of ALL rows of the step, fully masked ones included (TRL's "grpo" and "dr_grpo":
    a fully masked row is a sequence of loss 0); ``num_sequences=None`` means this call holds the whole step,
    S = mask.shape[0]. Only the counts the mode uses are required (others may be None); python numbers must be
    > 0, tensors are not checked (no device sync). Masked slots are ignored even if they hold NaN/inf."""
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"mode must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    m = mask.bool()
    masked = torch.where(m, per_token, torch.zeros_like(per_token))
    if mode == "token_mean":
        return masked.sum() / _positive(num_tokens, "num_tokens", mode)
    # S: all rows of the step; without a count this call is the whole step
    n_seq = max(m.shape[0], 1) if num_sequences is None else num_sequences
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1).to(masked.dtype)
        return per_seq.sum() / _positive(n_seq, "num_sequences", mode)
    const = _positive(norm_constant, "norm_constant", mode)
    if mode == "seq_mean_token_sum_norm":
        return masked.sum() / const
    return masked.sum() / (_positive(n_seq, "num_sequences", mode) * const)


def aggregate_token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, *, num_tokens: float | torch.Tensor
) -> torch.Tensor:
    """sum(per_token * mask) / num_tokens, num_tokens = GLOBAL valid-token count of the
    optimizer step, so summing micro-batch losses equals the global token mean
    (= aggregate_loss(mode="token_mean"))."""
    return aggregate_loss(per_token, mask, mode="token_mean", num_tokens=num_tokens, num_sequences=None)


def entropy_term(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    num_tokens: _Number | None,
    num_sequences: _Number | None = None,
) -> torch.Tensor:
    """Mean entropy of the optimizer step, this micro-batch's share, for ``loss -= entropy_coef * entropy_term``.

    It weights tokens as the policy loss of ``mode`` does, but as a mean (weights summing to 1 over the step when no
    row is fully masked), so entropy_coef keeps the same meaning (coef x nats) whatever the aggregation:

        "token_mean", "seq_mean_token_sum_norm", "constant":  sum_it m H / K
        "seq_mean_token_mean":                                sum_i [sum_t m H / max(1, n_i)] / S

    S counts all rows as in `aggregate_loss`, so under "seq_mean_token_mean" a fully masked row counts as a sequence
    of entropy 0, exactly as it counts as a sequence of loss 0 in the policy loss.

    The three token-weighted modes weight every valid token equally, so their mean is the token mean; using their
    own constant C instead would make the bonus scale with (tokens / C), i.e. with response length. TRL uses the
    token mean for every loss_type (equal to this except under "seq_mean_token_mean"); verl aggregates the entropy
    with loss_agg_mode itself (equal to this except under seq-mean-token-sum-norm, where verl's term is
    sum H / C). Like `aggregate_loss`, it is additive over micro-batches for fixed global K and S."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"mode must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    if mode == "seq_mean_token_mean":
        return aggregate_loss(entropy, mask, mode=mode, num_tokens=num_tokens, num_sequences=num_sequences)
    return aggregate_loss(entropy, mask, mode="token_mean", num_tokens=num_tokens, num_sequences=num_sequences)
