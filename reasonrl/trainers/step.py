"""One optimizer step (or `num_iterations` of them) on a rollout batch, with micro-batches and several ranks.

The loss of every micro-batch is divided by the GLOBAL number of valid completion tokens of the step, so the
accumulated gradient is the same whatever the micro-batch size or the number of processes.
"""

from __future__ import annotations

import contextlib
import math

import torch

from reasonrl.rl.losses import aggregate_token_mean, clipped_surrogate, k3_kl
from reasonrl.trainers.policy import completion_logprobs


def group_stats(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> dict:
    """Reward mean/std over valid samples and the fraction of groups whose valid rewards are all equal."""
    r, v = rewards.float(), valid.bool()
    kept = r[v]
    groups_r, groups_v = r.view(-1, group_size), v.view(-1, group_size)
    flat = 0
    for gr, gv in zip(groups_r, groups_v):
        vals = gr[gv]
        flat += int(vals.numel() < 2 or bool((vals == vals[0]).all()))
    return {
        "reward/mean": kept.mean().item() if kept.numel() else math.nan,
        "reward/std": kept.std(unbiased=False).item() if kept.numel() else math.nan,
        "reward/zero_std_frac": flat / groups_r.shape[0],
    }


def trainable_rows(advantages: torch.Tensor, mask: torch.Tensor, *, all_rows: bool) -> torch.Tensor:
    """Rows whose loss can have a gradient: some valid token and, unless a KL term needs every row, A != 0.

    Rows with A = 0 still count in the token normalizer (the loss definition is unchanged); skipping their
    forward/backward only saves compute.
    """
    has_tokens = mask.any(dim=-1)
    keep = has_tokens if all_rows else has_tokens & (advantages != 0)
    return keep.nonzero().squeeze(-1)


def split_micro_batches(rows: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """`count` chunks of at most `size` rows; trailing chunks are empty when this rank has fewer rows."""
    chunks = list(rows.split(size)) if rows.numel() else []
    return chunks + [rows.new_empty(0)] * (count - len(chunks))


def _micro_logprobs(model, batch, idx, *, pad_id, temperature):
    """Log-probs/entropy for rows `idx`, trimmed to their longest completion."""
    mask = batch.completion_mask[idx]
    width = max(1, int(mask.sum(-1).max()))
    mask = mask[:, :width]
    logp, ent = completion_logprobs(
        model, [batch.prompt_ids[i] for i in idx.tolist()], batch.completion_ids[idx, :width], mask,
        pad_id=pad_id, temperature=temperature,
    )
    return logp, ent, mask


@torch.no_grad()
def _fixed_logprobs(model, batch, chunks, *, pad_id, temperature) -> dict[int, torch.Tensor]:
    """Per-row log-probs under a frozen model (reference policy, or the policy before the first update)."""
    out = {}
    for idx in chunks:
        if idx.numel():
            logp, _, _ = _micro_logprobs(model, batch, idx, pad_id=pad_id, temperature=temperature)
            for j, row in enumerate(idx.tolist()):
                out[row] = logp[j]
    return out


def _stack_rows(table: dict[int, torch.Tensor], idx: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([table[row][:width] for row in idx.tolist()])


def train_on_batch(model, optimizer, scheduler, acc, batch, advantages, *, algo, optim, pad_id, temperature,
                   ref_model=None) -> dict:
    """Runs `algo.num_iterations` optimizer steps on this rank's rows of the batch; returns global metrics."""
    device = acc.device
    mask = batch.completion_mask
    global_tokens = acc.reduce(mask.sum().float().to(device), reduction="sum")
    rows = trainable_rows(advantages, mask, all_rows=algo.kl_coef > 0)
    size = optim.micro_batch_size
    count = int(acc.reduce(torch.tensor(math.ceil(rows.numel() / size), device=device), reduction="max"))
    chunks = split_micro_batches(rows, size, count)
    sums = dict.fromkeys(["tokens", "loss", "entropy", "kl", "clip_low", "clip_high", "is_skipped"], 0.0)
    grad_norms, lrs = [], []
    if count == 0 or global_tokens.item() == 0:  # no group carries a signal anywhere: nothing to learn
        sums["is_skipped"] = 1.0
        return _finish_metrics(acc, sums, grad_norms, lrs, algo.num_iterations)
    ref_logp = _fixed_logprobs(ref_model, batch, chunks, pad_id=pad_id, temperature=temperature) if ref_model else None
    old_logp = None
    if algo.num_iterations > 1:  # the importance ratio is measured against the policy that sampled the batch
        old_logp = _fixed_logprobs(model, batch, chunks, pad_id=pad_id, temperature=temperature)
    scale = acc.num_processes  # DDP averages gradients over ranks; the loss already divides by the global count
    for _ in range(algo.num_iterations):
        for k, idx in enumerate(chunks):
            weight = 1.0 if idx.numel() else 0.0
            if not idx.numel():  # keep collective calls in step with ranks that have more rows
                idx = torch.zeros(1, dtype=torch.long)
            sync = k == len(chunks) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                logp, ent, m = _micro_logprobs(model, batch, idx, pad_id=pad_id, temperature=temperature)
                width = m.shape[1]
                old = logp.detach() if old_logp is None else _stack_rows(old_logp, idx, width)
                adv = advantages[idx].to(logp.device)
                per_token, clip = clipped_surrogate(logp, old, adv, eps_low=algo.eps_low, eps_high=algo.eps_high,
                                                    mask=m)
                kl = k3_kl(logp, _stack_rows(ref_logp, idx, width)) if ref_logp is not None else None
                if kl is not None:
                    per_token = per_token + algo.kl_coef * kl
                loss = aggregate_token_mean(per_token, m, num_tokens=global_tokens)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) in a micro-batch of rows {idx.tolist()[:8]}...; check "
                        "the learning rate, model.dtype and the rewards (see reward/* metrics)"
                    )
                acc.backward(loss * scale * weight)
            n_tok = float(m.sum()) * weight
            sums["tokens"] += n_tok
            sums["loss"] += loss.item() * weight
            sums["entropy"] += float((ent.detach() * m).sum()) * weight
            sums["kl"] += float((kl.detach() * m).sum()) * weight if kl is not None else 0.0
            sums["clip_low"] += float(clip["clip/low_frac"]) * n_tok
            sums["clip_high"] += float(clip["clip/high_frac"]) * n_tok
        grad_norm = acc.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        grad_norms.append(float(grad_norm))
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return _finish_metrics(acc, sums, grad_norms, lrs, algo.num_iterations)


def _finish_metrics(acc, sums: dict, grad_norms: list, lrs: list, iterations: int) -> dict:
    keys = list(sums)
    totals = acc.reduce(torch.tensor([sums[k] for k in keys], device=acc.device), reduction="sum").tolist()
    total = dict(zip(keys, totals))
    tokens = max(total["tokens"], 1.0)
    return {
        "loss/policy": total["loss"] / iterations,
        "policy/entropy": total["entropy"] / tokens,
        "policy/kl": total["kl"] / tokens,
        "clip/low_frac": total["clip_low"] / tokens,
        "clip/high_frac": total["clip_high"] / tokens,
        "train/tokens": total["tokens"] / iterations,
        "train/skipped": float(total["is_skipped"] > 0),
        "optim/grad_norm": grad_norms[-1] if grad_norms else 0.0,
        "optim/lr": lrs[-1] if lrs else 0.0,
    }
