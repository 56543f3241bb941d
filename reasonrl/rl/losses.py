"""Token log-probs, PPO/GRPO clipped surrogate, k3 KL and token-mean aggregation."""

import torch


class _ChunkedLogpEntropy(torch.autograd.Function):
    """logp_t = log_softmax(z)[y_t], H_t = -sum_v p_v log p_v with z = logits / tau,
    computed over chunks of rows; backward recomputes each chunk:
    dlogp/dz = onehot(y) - p,  dH/dz = -p * (log p + H)."""

    @staticmethod
    def forward(ctx, logits2d, targets1d, chunk_size, temperature):
        n = logits2d.shape[0]
        cdt = torch.promote_types(logits2d.dtype, torch.float32)
        logp = logits2d.new_empty(n, dtype=cdt)
        ent = logits2d.new_empty(n, dtype=cdt)
        for s in range(0, n, chunk_size):
            z = logits2d[s : s + chunk_size].to(cdt) / temperature
            lsm = torch.log_softmax(z, dim=-1)
            logp[s : s + chunk_size] = lsm.gather(-1, targets1d[s : s + chunk_size, None]).squeeze(-1)
            ent[s : s + chunk_size] = -(lsm.exp() * lsm).sum(-1)
        ctx.save_for_backward(logits2d, targets1d, ent)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits2d, targets1d, ent = ctx.saved_tensors
        cs, tau = ctx.chunk_size, ctx.temperature
        grad = torch.empty_like(logits2d)
        cdt = ent.dtype
        for s in range(0, logits2d.shape[0], cs):
            z = logits2d[s : s + cs].to(cdt) / tau
            lsm = torch.log_softmax(z, dim=-1)
            p = lsm.exp()
            g = torch.zeros_like(z)
            if g_logp is not None:
                gl = g_logp[s : s + cs, None].to(cdt)
                g = g - gl * p
                g.scatter_add_(-1, targets1d[s : s + cs, None], gl)
            if g_ent is not None:
                g = g - g_ent[s : s + cs, None].to(cdt) * p * (lsm + ent[s : s + cs, None])
            grad[s : s + cs] = (g / tau).to(grad.dtype)
        return grad, None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
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


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO loss = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A), r = exp(logp - old_logp).

    Metrics (over valid tokens): clip/low_frac = frac(r < 1-eps_low and A < 0),
    clip/high_frac = frac(r > 1+eps_high and A > 0)."""
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"logp and old_logp must both be [N,T], got {tuple(logp.shape)} and {tuple(old_logp.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages [N] has N={advantages.shape[0]}, logp has N={logp.shape[0]}")
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [N] or [N,T], got {tuple(advantages.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    elif mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    adv = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    with torch.no_grad():
        m = mask.bool()
        denom = m.sum().clamp(min=1).float()
        low = ((ratio < 1.0 - eps_low) & (adv < 0) & m).sum() / denom
        high = ((ratio > 1.0 + eps_high) & (adv > 0) & m).sum() / denom
    return loss, {"clip/low_frac": low.detach(), "clip/high_frac": high.detach()}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"shape mismatch: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def aggregate_token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, *, num_tokens: float | torch.Tensor
) -> torch.Tensor:
    """sum(per_token * mask) / num_tokens, num_tokens = GLOBAL valid-token count of the
    optimizer step, so summing micro-batch losses equals the global token mean."""
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    if not isinstance(num_tokens, torch.Tensor) and not num_tokens > 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    return masked.sum() / num_tokens
