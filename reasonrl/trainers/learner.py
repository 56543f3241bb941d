"""The learner half of a step: a produced batch -> advantages -> sample and token selection -> loss -> update.

Each stage is one short method calling the pure function of reasonrl/rl that defines it; which stages run is fixed
by the recipe at start-up (`Stages`). The learner never asks which engine produced a batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from reasonrl.rl.advantages import compute_advantages
from reasonrl.rl.hapo import EntropyStats
from reasonrl.rl.length_control import linear_schedule, select_curriculum_tokens
from reasonrl.rl.losses import kl_estimate
from reasonrl.rl.shaping import kl_reward_penalty
from reasonrl.rl.staleness import staleness_counts, staleness_summary
from reasonrl.trainers import lora
from reasonrl.trainers.distributed import full_named_parameters
from reasonrl.trainers.optimization import advance_schedule
from reasonrl.trainers.prepare import (
    adaptive_temperature_metrics,
    d3s_keep_fractions,
    d3s_rollout_keep,
    d3s_token_mask,
    hapo_entropy_stats,
    hapo_h_hat,
    loss_mask_for,
)
from reasonrl.trainers.producer import ProducedBatch, correct_indicator
from reasonrl.trainers.step import fixed_logprobs, lockstep_acc, train_on_batch
from reasonrl.trainers.validation import hapo_reads_entropy, needs_entropy


@dataclass(frozen=True)
class Stages:
    """Which optional stages run, decided once from the recipe."""

    entropy: bool  # some stage reads the sampling policy's token entropies (validation.needs_entropy)
    kl_in_reward: bool
    hapo_stats: bool  # HAPO's entropy statistics: adaptive temperature, clip or redistribution
    hapo_h_hat: bool  # adaptive clip or redistribution: the per-token normalised entropy in the loss
    curriculum: bool  # RMT token curriculum

    @classmethod
    def of(cls, config, *, has_ref: bool) -> Stages:
        a, h = config.algorithm, config.algorithm.hapo
        return cls(entropy=needs_entropy(config), kl_in_reward=a.kl_in == "reward" and has_ref,
                   hapo_stats=hapo_reads_entropy(a),
                   hapo_h_hat=h.adaptive_clip or h.redistribution, curriculum=a.rmt.curriculum)


@dataclass
class Update:
    """What one learner step did: global advantages and rewards (every rank holds the same), token counts, the
    entropy statistics for the next step's sampling, and metrics."""

    rewards: torch.Tensor  # [N] this rank's rewards as trained on (shaped; minus the KL penalty when in the reward)
    all_rewards: torch.Tensor
    all_valid: torch.Tensor
    keep: torch.Tensor  # [N] this rank's rows kept by D3S
    tokens: dict  # before_d3s / after_d3s / trained: this rank's token counts
    sampling_stats: EntropyStats | None
    seconds_prepare: float
    seconds_train: float
    metrics: dict


class Learner:
    def __init__(self, config, *, acc, dp, model, optimizer, scheduler, ref_model=None, pad_id: int, sp=None,
                 zero=None):
        self.config, self.acc, self.dp, self.sp, self.zero = config, acc, dp, sp, zero
        self.model, self.optimizer, self.scheduler, self.ref_model = model, optimizer, scheduler, ref_model
        self.policy = acc.unwrap_model(model)
        self.pad_id = pad_id
        self.stages = Stages.of(config, has_ref=ref_model is not None)

    def step(self, produced: ProducedBatch, step: int) -> Update:
        """advantages -> selection -> loss -> optimizer -> lr schedule, on this rank's rows of `produced`."""
        t0 = time.perf_counter()
        cfg, a = self.config, self.config.algorithm
        batch, valid, rewards, metrics = produced.scored.batch, produced.scored.valid, produced.rewards, {}
        old_logp, entropy = self._sampling_policy_pass(batch)
        if a.hapo.adaptive_temperature and produced.sampled_with is not None and entropy is not None:
            metrics.update(adaptive_temperature_metrics(
                self.dp, entropy, batch.model_mask(), stats=produced.sampled_with,
                base_temperature=cfg.rollout.temperature, tau=a.hapo.temperature_tau, sign_mode=a.hapo.sign_mode))
        if self.stages.kl_in_reward:
            kl_penalty = self._kl_reward_penalty(batch, old_logp)
            rewards = rewards - kl_penalty.to(rewards)
            metrics["reward/kl_penalty"] = nanmean_across(self.dp, kl_penalty)
        sample_keep, token_keep = d3s_keep_fractions(a.d3s, step=step, total_steps=cfg.trainer.steps)
        advantages, keep, all_rewards, all_valid = self._advantages(rewards, valid, produced.lengths, sample_keep,
                                                                    metrics)
        tokens = self._select_tokens(batch, valid, advantages, keep, entropy, token_keep, step)
        ntp_weight = self._ntp_rows(produced, step, metrics)
        stats, h_hat = self._hapo(entropy, batch, valid, metrics)
        if cfg.rollout.max_staleness:
            metrics.update(self._staleness(batch, step))
        t1 = time.perf_counter()
        metrics.update(train_on_batch(
            self.model, self.optimizer, self.scheduler, self.dp, batch, advantages,
            algo=a, optim=cfg.optim, pad_id=self.pad_id, temperature=cfg.rollout.temperature,
            norm_constant=a.loss_norm_constant or cfg.rollout.max_new_tokens, ref_model=self.ref_model,
            old_logp=old_logp, h_hat=h_hat, rollout_is=self._rollout_is(), rl_weight=a.rmt.rl_weight,
            ntp_weight=ntp_weight,
        ))
        advance_schedule(self.scheduler)
        tokens["trained"] = batch.loss_mask.sum()
        return Update(rewards, all_rewards, all_valid, keep, tokens, stats, t1 - t0, time.perf_counter() - t1, metrics)

    def weights(self):
        """(name, tensor) pairs of the full policy for the engine (LoRA: W + scale * B @ A; under ZeRO-3 gathered
        bucket by bucket, a collective)."""
        if self.config.model.lora.enabled:  # the engine holds the plain model
            return lora.merged_named_parameters(self.policy)
        return full_named_parameters(self.policy, self.zero)

    # ------------------------------------------------------------------------------------------------ stages
    def _sampling_policy_pass(self, batch):
        """(log-probs, entropies) [N, T] of the policy that sampled the batch, by a no-grad forward. Skipped when
        nothing needs them or when the engine returned the entropies (the hf engine does)."""
        a = self.config.algorithm
        need_entropy = self.stages.entropy and batch.rollout_entropy is None
        need_logp = a.num_iterations > 1 or self.stages.kl_in_reward
        if not (need_entropy or need_logp):
            return None, batch.rollout_entropy
        logp, entropy = self._frozen_logprobs(self.model, batch)
        return (logp if need_logp else None), (entropy if batch.rollout_entropy is None else batch.rollout_entropy)

    def _frozen_logprobs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad (log-probs, entropies) [N, T] of every non-empty row, micro-batched as the training step is."""
        o = self.config.optim
        rows = batch.completion_mask.any(-1).nonzero().squeeze(-1)
        return fixed_logprobs(model, batch, rows, pad_id=self.pad_id, temperature=self.config.rollout.temperature,
                              micro_batch_size=o.micro_batch_size, token_budget=o.micro_batch_tokens,
                              packed=o.packing, lockstep_acc=lockstep_acc(self.acc), sequence_parallel=self.sp)

    def _kl_reward_penalty(self, batch, old_logp: torch.Tensor) -> torch.Tensor:
        ref_logp, _ = self._frozen_logprobs(self.ref_model, batch)
        per_token = kl_estimate(old_logp, ref_logp, self.config.algorithm.kl_estimator)
        return kl_reward_penalty(per_token, batch.model_mask(), coef=self.config.algorithm.kl_coef)

    def _advantages(self, rewards, valid, lengths, sample_keep: float, metrics: dict):
        """Advantages from every rank's rewards (group or batch statistics: all ranks compute the same global
        vector), and D3S's rollout selection; returns this rank's (advantages, keep) and the global rewards."""
        a, g, acc = self.config.algorithm, self.config.rollout.group_size, self.dp
        all_rewards, all_valid, all_lengths = acc.gather(rewards), acc.gather(valid), acc.gather(lengths)
        all_adv, adv_metrics = compute_advantages(
            all_rewards, estimator=a.advantage, group_size=g, valid=all_valid, lengths=all_lengths, eps=a.std_eps,
            unbiased_std=a.unbiased_std, scale=a.scale_rewards, fallback_threshold=a.hapo.fallback_threshold,
        )
        metrics.update(adv_metrics)
        keep_all = d3s_rollout_keep(all_adv, a.d3s, keep_fraction=sample_keep, group_size=g)
        n_local, start = rewards.numel(), acc.process_index * rewards.numel()
        return all_adv[start : start + n_local], keep_all[start : start + n_local], all_rewards, all_valid

    def _select_tokens(self, batch, valid, advantages, keep, entropy, token_keep: float, step: int) -> dict:
        """batch.loss_mask: valid (and, unless masked, untruncated) rows kept by D3S, then D3S's token level and the
        RMT curriculum. Returns this rank's token counts before and after D3S's token level."""
        a, steps = self.config.algorithm, self.config.trainer.steps
        batch.loss_mask = loss_mask_for(batch, valid, mask_truncated=a.overlong.mask_truncated) & keep[:, None]
        before = batch.loss_mask.sum()
        if token_keep < 1:
            batch.loss_mask = d3s_token_mask(self.dp, advantages, entropy, batch.loss_mask, keep_fraction=token_keep,
                                             scope=a.d3s.token_scope)
        after = batch.loss_mask.sum()
        if self.stages.curriculum:  # RMT: RL on a share of the tokens, from low to high entropy over training
            r = a.rmt
            batch.loss_mask = select_curriculum_tokens(
                entropy, batch.loss_mask & batch.model_mask(), step / max(steps - 1, 1),
                fraction=r.token_fraction, start=r.target_start, end=r.target_end, width=r.width,
                generator=torch.Generator().manual_seed(self.config.trainer.seed * 7_919 + step))
        return {"before_d3s": before, "after_d3s": after}

    def _ntp_rows(self, produced: ProducedBatch, step: int, metrics: dict) -> float:
        """RMT dual loss: the NTP weight of this step, and batch.ntp_mask (every token of the chosen rows)."""
        r = self.config.algorithm.rmt
        ntp_weight = linear_schedule(step, max(self.config.trainer.steps - 1, 1), start=r.ntp_weight_start,
                                     end=r.ntp_weight_end)
        if ntp_weight:
            scored = produced.scored
            rows = scored.valid & (correct_indicator(scored) > 0) if r.ntp_rows == "correct" else scored.valid
            scored.batch.ntp_mask = scored.batch.model_mask() & rows[:, None]
            metrics["rmt/ntp_weight"] = ntp_weight
        return ntp_weight

    def _hapo(self, entropy, batch, valid, metrics: dict):
        """HAPO's entropy statistics (the next step samples with them) and, for its loss, the normalised entropy."""
        if not self.stages.hapo_stats:
            return None, None
        h = self.config.algorithm.hapo
        stats = hapo_entropy_stats(self.dp, entropy, batch.model_mask() & valid[:, None], pivot=h.entropy_pivot)
        h_hat = hapo_h_hat(entropy, stats, sign_mode=h.sign_mode) if self.stages.hapo_h_hat else None
        metrics.update({"hapo/entropy_pivot": stats.m, "hapo/entropy_rms": stats.sigma})
        return stats, h_hat

    def _staleness(self, batch, step: int) -> dict:
        """How far the trained tokens lag the learner (version `step`), over every rank: mean, max and the number of
        tokens at each lag 0..k. A trained token more than k behind is a bug of the pipeline: it stops the run."""
        k = self.config.rollout.max_staleness
        counts = staleness_counts(batch.token_versions, batch.trained_mask(), learner_version=step)
        if counts.numel() > k + 1:
            raise RuntimeError(f"step {step} would train on a token {counts.numel() - 1} policy versions old, more "
                               f"than rollout.max_staleness={k}")
        counts = torch.nn.functional.pad(counts, (0, k + 1 - counts.numel())).float().to(self.acc.device)
        counts = self.dp.reduce(counts, reduction="sum").cpu()
        return {**staleness_summary(counts), **{f"async/tokens_at_lag_{lag}": float(n)
                                                for lag, n in enumerate(counts.tolist())}}

    def _rollout_is(self) -> dict | None:
        r = self.config.rollout
        on = r.engine != "hf" if r.is_correction is None else r.is_correction
        return {"level": r.is_level, "mode": r.is_mode, "cap": r.is_cap, "floor": r.is_floor} if on else None


def nanmean_across(acc, values: torch.Tensor) -> float:
    """Mean of the non-NaN values over every rank (NaN when there are none)."""
    finite = ~torch.isnan(values)
    both = torch.stack([torch.where(finite, values, 0.0).sum(), finite.sum().float()])
    total, count = acc.reduce(both, reduction="sum").tolist()
    return total / count if count else float("nan")
