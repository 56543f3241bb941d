"""One optimizer step (or `num_iterations` of them) on a rollout batch, with micro-batches and several ranks.

Every micro-batch loss is normalized by GLOBAL counts of the step (valid tokens, sequences), so the accumulated
gradient is the same whatever the micro-batch size or the number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from reasonrl.rl.hapo import hapo_surrogate
from reasonrl.rl.importance import rollout_correction
from reasonrl.rl.length_control import dual_loss, ntp_token_loss
from reasonrl.rl.losses import aggregate_loss, clipped_surrogate, entropy_term, kl_estimate
from reasonrl.trainers.distributed import backward, optimizer_step, zero_stage
from reasonrl.trainers.policy import completion_logprobs, packed_completion_logprobs
from reasonrl.trainers.sequence_parallel import (
    gradient_world_size,
    sequence_parallel_completion_logprobs,
    sequence_parallel_of,
)


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
    """Rows whose loss can have a gradient: some trained token and, unless a KL or entropy term needs every row,
    A != 0.

    Rows with A = 0 still count in the normalizers (the loss definition is unchanged); skipping their
    forward/backward only saves compute.
    """
    has_tokens = mask.any(dim=-1)
    keep = has_tokens if all_rows else has_tokens & (advantages != 0)
    return keep.nonzero().squeeze(-1)


def _rows_to_train(advantages, mask, ntp_mask, *, all_rows: bool) -> torch.Tensor:
    """`trainable_rows`, plus the rows with next-token-prediction tokens (they take part even when A = 0)."""
    rows = trainable_rows(advantages, mask, all_rows=all_rows)
    if ntp_mask.any():
        rows = torch.unique(torch.cat([rows, ntp_mask.any(-1).nonzero().squeeze(-1)]))
    return rows


def split_micro_batches(rows: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """`count` chunks of at most `size` rows; trailing chunks are empty when this rank has fewer rows."""
    chunks = list(rows.split(size)) if rows.numel() else []
    return chunks + [rows.new_empty(0)] * (count - len(chunks))


def split_by_token_budget(rows: torch.Tensor, lengths: torch.Tensor, budget: int, *,
                          padded: bool = False) -> list[torch.Tensor]:
    """Consecutive chunks of `rows` (row order kept, so a group's rows stay together) whose token cost is <= budget.

    lengths[k]: tokens of row rows[k] (prompt + completion). A chunk costs the sum of its lengths (a packed forward)
    or, with `padded`, its row count times its longest length (a padded forward). Greedy: a row joins the current
    chunk unless that would exceed the budget; a row longer than the budget gets a chunk of its own. No chunk is
    empty; no rows, no chunks.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    chunks, start, total, longest = [], 0, 0, 0
    for k, n in enumerate(lengths.tolist()):
        grown_total, grown_longest = total + n, max(longest, n)
        cost = (k - start + 1) * grown_longest if padded else grown_total
        if k > start and cost > budget:
            chunks.append(rows[start:k])
            start, grown_total, grown_longest = k, n, n
        total, longest = grown_total, grown_longest
    if rows.numel():
        chunks.append(rows[start:])
    return chunks


def row_tokens(batch, rows: torch.Tensor) -> torch.Tensor:
    """Model-input tokens of each row in `rows`: prompt plus real completion tokens."""
    prompt = torch.tensor([len(batch.prompt_ids[i]) for i in rows.tolist()], dtype=torch.long)
    return prompt + batch.completion_mask[rows].sum(-1).cpu().long()


def micro_batches(batch, rows: torch.Tensor, *, size: int, token_budget: int | None = None,
                  packed: bool = False) -> list[torch.Tensor]:
    """This rank's micro-batches of `rows`: `size` rows each, or, with a token budget, by tokens (costed as the
    forward that will run: packed or padded). The caller pads the list to the count agreed across ranks."""
    if token_budget is None:
        return split_micro_batches(rows, size, 0)
    return split_by_token_budget(rows, row_tokens(batch, rows), token_budget, padded=not packed)


def agreed_micro_batches(acc, chunks: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """`chunks` padded with empty micro-batches to the largest count of any rank, so every rank runs the same number
    of forward (and backward) calls: DDP's gradient reduction and ZeRO-3's parameter gathers are collective."""
    count = int(acc.reduce(torch.tensor(len(chunks), device=acc.device), reduction="max"))
    return chunks + [rows.new_empty(0)] * (count - len(chunks))


def lockstep_acc(acc):
    """The Accelerator when even no-grad forwards are collective (ZeRO-3 shards the parameters), else None."""
    return acc if zero_stage(acc) == 3 else None


def _micro_logprobs(model, batch, idx, *, pad_id, temperature, packed: bool = False, sequence_parallel=None):
    """Log-probs/entropy [n, W] for rows `idx`, W = their longest completion (the model input is the whole
    completion; which tokens count in the loss is the caller's business). `packed`: the padding-free forward;
    `sequence_parallel`: one row split across its group (`sequence_parallel_completion_logprobs`); otherwise the
    shared-prompt forward (or, under gradient checkpointing, the full padded sequences: see `completion_logprobs`)."""
    inputs = batch.completion_mask[idx]
    width = max(1, int(inputs.sum(-1).max()))
    forward = packed_completion_logprobs if packed else completion_logprobs
    if sequence_parallel is not None:
        forward = functools.partial(sequence_parallel_completion_logprobs, sp=sequence_parallel)
    logp, ent = forward(
        model, [batch.prompt_ids[i] for i in idx.tolist()], batch.completion_ids[idx, :width], inputs[:, :width],
        pad_id=pad_id, temperature=temperature,
    )
    return logp, ent, width


@torch.no_grad()
def fixed_logprobs(model, batch, rows: torch.Tensor, *, pad_id, temperature, micro_batch_size: int,
                   token_budget: int | None = None, packed: bool = False, lockstep_acc=None, sequence_parallel=None):
    """Log-probs and entropies [N, T] (zeros outside `rows`) under a frozen model: the reference policy, or the
    policy that sampled the batch (for `num_iterations > 1`, HAPO and D3S). Micro-batches as in `micro_batches`.

    lockstep_acc: an Accelerator when every forward is collective (a ZeRO-3 sharded model): all ranks then run the
    same number of forwards, a rank with fewer micro-batches repeating a throw-away one.
    """
    n, t = batch.completion_ids.shape
    logp, ent = torch.zeros(n, t), torch.zeros(n, t)
    chunks = micro_batches(batch, rows, size=micro_batch_size, token_budget=token_budget, packed=packed)
    if lockstep_acc is not None:
        chunks = agreed_micro_batches(lockstep_acc, chunks, rows)
    for idx in chunks:
        if not idx.numel():  # keeps collective forwards in step with ranks that have more rows
            _micro_logprobs(model, batch, torch.zeros(1, dtype=torch.long), pad_id=pad_id, temperature=temperature,
                            packed=packed, sequence_parallel=sequence_parallel)
            continue
        lp, h, width = _micro_logprobs(model, batch, idx, pad_id=pad_id, temperature=temperature, packed=packed,
                                       sequence_parallel=sequence_parallel)
        logp[idx, :width], ent[idx, :width] = lp.float().cpu(), h.float().cpu()
    return logp, ent


def _policy_loss(logp, old, adv, h_hat, mask, algo):
    """Per-token policy-gradient loss of a micro-batch: PPO/GRPO clipping, or HAPO's adaptive clipping and
    advantage redistribution when they are on (h_hat given)."""
    if h_hat is None:
        return clipped_surrogate(logp, old, adv, eps_low=algo.eps_low, eps_high=algo.eps_high, mask=mask,
                                 dual_clip=algo.dual_clip)
    h = algo.hapo
    return hapo_surrogate(
        logp, old, adv, h_hat, eps_low=algo.eps_low, eps_high=algo.eps_high,
        alpha=h.clip_alpha if h.adaptive_clip else 0.0, beta=h.adv_beta if h.redistribution else 0.0,
        clip_ratio_c=algo.dual_clip, mask=mask,
    )


def _per_token_loss(logp, old, adv, h_hat, mask, algo, *, rollout_is=None, rollout_logp=None, ref_logp=None):
    """A micro-batch's per-token loss: the clipped surrogate, reweighted by the engine/trainer importance correction
    when it is on (`rollout_is` and the engine's log-probs), plus the KL term (not reweighted, as TRL). Returns
    (per_token, clip/sampling metrics, per-token KL or None, the IS extremes [max |logp diff|, max ratio, -min
    ratio] or None)."""
    per_token, clip = _policy_loss(logp, old, adv, h_hat, mask, algo)
    extreme = None
    if rollout_is is not None and rollout_logp is not None:
        weights, mismatch = rollout_correction(old, rollout_logp, mask, **rollout_is)
        per_token = per_token * weights
        clip = {**clip, "sampling/logp_diff_mean": mismatch["sampling/logp_diff_mean"],
                "sampling/is_ratio_mean": mismatch["sampling/is_ratio_mean"]}
        extreme = [float(mismatch["sampling/logp_diff_max"]), float(mismatch["sampling/is_ratio_max"]),
                   -float(mismatch["sampling/is_ratio_min"])]
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, algo.kl_estimator)
        per_token = per_token + algo.kl_coef * kl
    return per_token, clip, kl, extreme


def _dual_objective(rl_loss, logp, ntp_mask, *, rl_weight: float, ntp_weight: float, ntp_tokens):
    """RMT's rl_weight * L_RL + ntp_weight * L_NTP (L_NTP over the step's `ntp_tokens`); returns (loss, L_NTP or
    None when ntp_weight = 0)."""
    if ntp_weight:
        ntp = ntp_token_loss(logp, ntp_mask, num_tokens=ntp_tokens)
        return dual_loss(rl_loss, ntp, rl_weight=rl_weight, ntp_weight=ntp_weight), ntp
    return (rl_weight * rl_loss if rl_weight != 1.0 else rl_loss), None


def train_on_batch(model, optimizer, scheduler, acc, batch, advantages, *, algo, optim, pad_id, temperature,
                   norm_constant: int | None = None, ref_model=None, old_logp=None, h_hat=None,
                   rollout_is: dict | None = None, rl_weight: float = 1.0, ntp_weight: float = 0.0) -> dict:
    """Runs `algo.num_iterations` optimizer steps on this rank's rows of the batch; returns global metrics.

    The learning-rate schedule is a function of the trainer step: every iteration of a step uses the same lr, and
    the caller steps `scheduler` once per trainer step, trained or skipped. Token-based schedules (`add_tokens`)
    count the tokens of each optimizer step here.

    old_logp: [N, T] log-probs of the sampling policy (None: the first iteration's own, detached: ratio 1).
    h_hat: [N, T] HAPO normalized entropy, when adaptive clipping or advantage redistribution is on.
    rollout_is: keyword arguments of `rollout_correction` (level, mode, cap, floor) to reweight the policy-gradient
    term by pi_old / pi_rollout with the engine's log-probs (`batch.rollout_logprobs`); None: off.
    rl_weight, ntp_weight: RMT's dual objective rl_weight * L_RL + ntp_weight * L_NTP, L_NTP the token-mean negative
    log-likelihood of the `batch.ntp_mask` tokens (over every rank); ntp_weight = 0: plain RL.
    """
    mask = batch.trained_mask()
    ntp_mask = batch.ntp_mask if ntp_weight and batch.ntp_mask is not None else torch.zeros_like(mask)
    ntp_mask = ntp_mask & batch.model_mask()
    # every row counts as a sequence, trained tokens or not (TRL's grpo/dr_grpo normalisation)
    counts = torch.tensor([mask.sum(), mask.shape[0], ntp_mask.sum()], dtype=torch.float, device=acc.device)
    global_tokens, global_seqs, global_ntp_tokens = acc.reduce(counts, reduction="sum")
    kl_in_loss = ref_model is not None and algo.kl_in == "loss"
    rows = _rows_to_train(advantages, mask, ntp_mask, all_rows=kl_in_loss or algo.entropy_coef != 0)
    size, budget, packed = optim.micro_batch_size, optim.micro_batch_tokens, optim.packing
    chunks = agreed_micro_batches(acc, micro_batches(batch, rows, size=size, token_budget=budget, packed=packed), rows)
    sp = sequence_parallel_of(acc)
    frozen = {"pad_id": pad_id, "temperature": temperature, "micro_batch_size": size, "token_budget": budget,
              "packed": packed, "lockstep_acc": lockstep_acc(acc), "sequence_parallel": sp}
    sums = dict.fromkeys(["tokens", "loss", "entropy", "kl", "is_skipped", "ntp"], 0.0)
    token_weighted: dict[str, float] = {}  # per-token fractions/means of the loss (clip/*, hapo/*, sampling/*)
    extremes: list[list[float]] = []  # per micro-batch [max |logp diff|, max IS ratio, -min IS ratio]
    grad_norms, lrs = [], []
    if not chunks or (global_tokens.item() == 0 and global_ntp_tokens.item() == 0):  # nothing to learn anywhere
        sums["is_skipped"] = 1.0
        return _finish_metrics(acc, sums, grad_norms, [_current_lr(optimizer)], algo.num_iterations)
    ref_logp = None
    if kl_in_loss:
        ref_logp, _ = fixed_logprobs(ref_model, batch, rows, **frozen)
    if old_logp is None and algo.num_iterations > 1:  # the ratio is measured against the policy that sampled
        old_logp, _ = fixed_logprobs(model, batch, rows, **frozen)
    # DDP averages gradients over every rank; the loss already divides by global counts (under sequence parallelism
    # the ranks of a group hold shares of the same rows: their gradients add up to the rows' gradient)
    scale = gradient_world_size(acc)
    agg = {"mode": algo.loss_agg, "num_tokens": global_tokens, "num_sequences": global_seqs}
    for _ in range(algo.num_iterations):
        for k, idx in enumerate(chunks):
            weight = 1.0 if idx.numel() else 0.0
            if not idx.numel():  # keep collective calls in step with ranks that have more rows
                idx = torch.zeros(1, dtype=torch.long)
            sync = k == len(chunks) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                logp, ent, width = _micro_logprobs(model, batch, idx, pad_id=pad_id, temperature=temperature,
                                                   packed=packed, sequence_parallel=sp)
                m = mask[idx, :width].to(logp.device)
                old = logp.detach() if old_logp is None else old_logp[idx, :width].to(logp)
                h = None if h_hat is None else h_hat[idx, :width].to(logp)
                rollout_logp = None if batch.rollout_logprobs is None else batch.rollout_logprobs[idx, :width].to(old)
                per_token, clip, kl, extreme = _per_token_loss(
                    logp, old, advantages[idx].to(logp), h, m, algo, rollout_is=rollout_is, rollout_logp=rollout_logp,
                    ref_logp=None if ref_logp is None else ref_logp[idx, :width].to(logp))
                if weight and extreme is not None:
                    extremes.append(extreme)
                rl_loss = aggregate_loss(per_token, m, norm_constant=norm_constant, **agg) if global_tokens.item() > 0 \
                    else (per_token * 0.0).sum()  # only next-token-prediction tokens this step
                if algo.entropy_coef:
                    rl_loss = rl_loss - algo.entropy_coef * entropy_term(ent, m, **agg)
                loss, ntp = _dual_objective(rl_loss, logp, ntp_mask[idx, :width].to(logp.device), rl_weight=rl_weight,
                                            ntp_weight=ntp_weight, ntp_tokens=global_ntp_tokens)
                sums["ntp"] += float(ntp.detach()) * weight if ntp is not None else 0.0
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) in a micro-batch of rows {idx.tolist()[:8]}...; check "
                        "the learning rate, model.dtype and the rewards (see reward/* metrics)"
                    )
                backward(acc, model, loss * scale * weight, last=sync)
            _accumulate(sums, token_weighted, mask=m, weight=weight, rl_loss=rl_loss, entropy=ent, kl=kl, clip=clip)
        if hasattr(scheduler, "add_tokens"):  # token-based schedules see the tokens of this optimizer step
            scheduler.add_tokens(float(global_tokens))
        lrs.append(_current_lr(optimizer))
        grad_norms.append(optimizer_step(acc, model, optimizer, max_grad_norm=optim.max_grad_norm))
    metrics = _finish_metrics(acc, sums, grad_norms, lrs, algo.num_iterations, token_weighted)
    if rollout_is is not None and batch.rollout_logprobs is not None:
        metrics.update(_extreme_metrics(acc, extremes))
    return metrics


def _accumulate(sums: dict, token_weighted: dict, *, mask, weight: float, rl_loss, entropy, kl, clip: dict) -> None:
    """Adds one micro-batch (weight 0: a throw-away one kept for the collectives) to the step's sums."""
    n_tok = float(mask.sum()) * weight
    sums["tokens"] += n_tok
    sums["loss"] += rl_loss.item() * weight
    sums["entropy"] += float((entropy.detach() * mask).sum()) * weight
    sums["kl"] += float((kl.detach() * mask).sum()) * weight if kl is not None else 0.0
    for key, value in clip.items():
        token_weighted[key] = token_weighted.get(key, 0.0) + float(value) * n_tok


def _extreme_metrics(acc, extremes: list[list[float]]) -> dict:
    """The IS correction's extremes over every micro-batch of every rank (one collective max)."""
    local = torch.tensor(extremes, dtype=torch.float64).amax(0) if extremes else torch.full((3,), -math.inf,
                                                                                              dtype=torch.float64)
    diff_max, ratio_max, neg_ratio_min = acc.reduce(local.to(acc.device), reduction="max").tolist()
    return {"sampling/logp_diff_max": diff_max, "sampling/is_ratio_max": ratio_max,
            "sampling/is_ratio_min": -neg_ratio_min}


def _current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _finish_metrics(acc, sums: dict, grad_norms: list, lrs: list, iterations: int,
                    token_weighted: dict | None = None) -> dict:
    weighted = {"clip/low_frac": 0.0, "clip/high_frac": 0.0, "clip/dual_frac": 0.0, **(token_weighted or {})}
    keys = list(sums) + sorted(weighted)
    values = [sums[k] for k in sums] + [weighted[k] for k in sorted(weighted)]
    totals = acc.reduce(torch.tensor(values, device=acc.device), reduction="sum").tolist()
    total = dict(zip(keys, totals))
    tokens = max(total["tokens"], 1.0)
    return {
        **{k: total[k] / tokens for k in weighted},
        "loss/policy": total["loss"] / iterations,
        "loss/ntp": total["ntp"] / iterations,
        "policy/entropy": total["entropy"] / tokens,
        "policy/kl": total["kl"] / tokens,
        "train/tokens": total["tokens"] / iterations,
        "train/skipped": float(total["is_skipped"] > 0),
        "optim/grad_norm": grad_norms[-1] if grad_norms else 0.0,
        "optim/lr": lrs[-1] if lrs else 0.0,
    }
