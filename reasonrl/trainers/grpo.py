"""GRPO-family trainer: generate -> score -> shape -> advantages -> down-sample -> policy loss, one process or many.

The algorithm (GRPO, Dr.GRPO, RLOO, DAPO, HAPO, D3S and their parts) is chosen in the recipe's `algorithm` section.

Run it as `accelerate launch -m reasonrl.trainers.grpo --config recipes/X.yaml key=value ...`
or `reasonrl train recipes/X.yaml key=value ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from reasonrl.batch import RolloutBatch
from reasonrl.config import ConfigError, RecipeConfig, load_config, save_config
from reasonrl.data.effort import with_effort
from reasonrl.data.prompts import encode_prompt
from reasonrl.data.tasks import load_task_rows
from reasonrl.malloc_tuning import tune_malloc
from reasonrl.models import load_model, load_tokenizer, resolve_model_path
from reasonrl.rewards.combine import RewardFailureError, resolve_reward, score_batch
from reasonrl.rewards.math import take_grader_errors
from reasonrl.rl.advantages import compute_advantages
from reasonrl.rl.hapo import EntropyStats
from reasonrl.rl.length_control import linear_schedule, select_curriculum_tokens
from reasonrl.rl.losses import kl_estimate
from reasonrl.rl.shapers import BudgetShaper, EffortShaper, ShapingContext, apply_shapers
from reasonrl.rl.shaping import kl_reward_penalty
from reasonrl.rollout.base import AdaptiveTemperature, SamplingParams
from reasonrl.rollout.factory import build_engine
from reasonrl.trainers import checkpoint as ckpt
from reasonrl.trainers import lora
from reasonrl.trainers.collect import Scored, dynamic_sampling
from reasonrl.trainers.data_order import prompts_for_step
from reasonrl.trainers.distributed import (
    build_accelerator,
    configure_deepspeed,
    fingerprint,
    full_named_parameters,
    is_peer_failure,
    leave_process_group,
    load_portable_optimizer_state,
    portable_optimizer_state,
    sharded_inference_engine,
    zero_stage,
)
from reasonrl.trainers.evaluate import greedy_accuracy
from reasonrl.trainers.optimization import build_optimizer, build_scheduler
from reasonrl.trainers.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from reasonrl.trainers.preemption import PreemptionWatch
from reasonrl.trainers.prepare import (
    adaptive_temperature_metrics,
    d3s_keep_fractions,
    d3s_rollout_keep,
    d3s_token_mask,
    hapo_entropy_stats,
    hapo_h_hat,
    loss_mask_for,
)
from reasonrl.trainers.sequence_parallel import DataParallelView, broadcast_from_leader, build_sequence_parallel
from reasonrl.trainers.step import fixed_logprobs, group_stats, lockstep_acc, train_on_batch
from reasonrl.trainers.sync_check import check_weight_sync, default_tolerance
from reasonrl.trainers.tracking import Tracker
from reasonrl.trainers.validation import build_reward_shapers, needs_entropy, validate


def _uses_hapo_entropy(algo) -> bool:
    h = algo.hapo
    return h.adaptive_temperature or h.adaptive_clip or h.redistribution



class GRPOTrainer:
    def __init__(self, config: RecipeConfig, accelerator: Accelerator | None = None):
        self.config = config
        self.acc = accelerator or build_accelerator(config.trainer.collective_timeout_s)
        self.zero = zero_stage(self.acc)  # DeepSpeed ZeRO stage, None without DeepSpeed
        validate(config, self.acc.num_processes)
        # sequence parallelism: groups of ranks share rows; `self.dp` is the accelerator as the data sees it
        self.sp = build_sequence_parallel(self.acc.num_processes, self.acc.process_index, config.model.sparse_attention)
        if self.sp is not None and self.zero == 3:
            raise ConfigError("model.sparse_attention.sequence_parallel > 1 is not supported with ZeRO-3 (use ZeRO-2)")
        self.dp = self.acc if self.sp is None else DataParallelView(self.acc, self.sp)
        self.out_dir = Path(config.trainer.output_dir)
        set_seed(config.trainer.seed)

        self.train_rows, self.eval_rows = load_task_rows(config.data)
        self.reward_funcs = [
            (spec.name, functools.partial(resolve_reward(spec.name), **spec.args), spec.weight)
            for spec in config.rewards
        ]
        self.logged_reward_errors: set[str] = set()
        self.failed_reward_steps = 0  # consecutive steps on which no sample got a reward
        self.shapers = build_reward_shapers(config)
        self.budget_shaper = next((x for x in self.shapers if isinstance(x, BudgetShaper)), None)
        self.effort_shaper = next((x for x in self.shapers if isinstance(x, EffortShaper)), None)

        with self.acc.main_process_first():  # the built-in model is converted once, by the main process
            self.model_path = resolve_model_path(config.model.name_or_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.resume_from = ckpt.latest_checkpoint(self.out_dir) if config.trainer.resume == "auto" else None
        lora_on = config.model.lora.enabled  # LoRA: the base weights always come from model_path
        policy_path = str(self.resume_from / "model") if self.resume_from and not lora_on else self.model_path
        attention = {"attn_implementation": config.model.attn_implementation,
                     "sparse_attention": dataclasses.asdict(config.model.sparse_attention)}
        model = load_model(policy_path, dtype=config.model.dtype, **attention)
        if config.model.gradient_checkpointing:  # active in train mode only (see policy.completion_logprobs)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # (from_pretrained returns eval mode; the engines switch to eval mode to generate)
        if lora_on:  # only the adapters train; a resumed run puts its saved adapters on the base model
            model = lora.apply_lora(model, config.model.lora)
            if self.resume_from:
                lora.load_adapters(model, self.resume_from / lora.ADAPTER_DIR)
        self.ref_model = None
        if config.algorithm.kl_coef > 0 and lora_on:  # the reference is the policy with its adapters off
            self.ref_model = lora.DisabledAdapterReference(model)
        elif config.algorithm.kl_coef > 0:
            self.ref_model = load_model(self.model_path, dtype=config.model.dtype, **attention)
            self.ref_model.eval().requires_grad_(False)
            self.ref_model.to(self.acc.device)
        optimizer = build_optimizer(model, config.optim)
        if self.zero is not None:
            configure_deepspeed(self.acc, max_grad_norm=config.optim.max_grad_norm)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.scheduler = build_scheduler(  # not prepared: see build_scheduler
            optimizer, config.optim, total_steps=config.trainer.steps,
            sequences_per_step=config.rollout.prompts_per_step * config.rollout.group_size,
        )
        self.policy = self.acc.unwrap_model(self.model)
        if self.zero == 3 and self.ref_model is not None and not lora_on:  # loaded sharded (zero.Init): give it
            self.ref_model = sharded_inference_engine(self.ref_model, self.acc)  # ZeRO-3's gather hooks
        if self.zero == 3 and lora_on:
            raise ConfigError("model.lora.enabled with DeepSpeed ZeRO-3 is not supported: use ZeRO-2 (LoRA's "
                              "optimizer state is small) or full fine-tuning under ZeRO-3")
        self.engine = build_engine(
            config.rollout, model=self.policy, tokenizer=self.tokenizer, model_path=policy_path,
            model_dtype=config.model.dtype, seed=config.trainer.seed,
        )
        if self.zero == 3 and hasattr(self.engine, "synced_gpus"):
            self.engine.synced_gpus = True
        self.engine_asleep = False
        self.preempted_by: str | None = None  # the signal that stopped the run early, if any
        # the server (and a resumed LoRA run's vllm engine) starts from the base model; it must sample from ours
        if config.rollout.engine == "server" or (lora_on and self.resume_from):
            self._sync_weights()
        self.needs_entropy = needs_entropy(config)  # decided once: HAPO, D3S tokens or the RMT curriculum read them
        if hasattr(self.engine, "return_entropy"):  # free with the hf engine; others need an old-policy pass
            self.engine.return_entropy = self.needs_entropy
        self.sampling_stats: EntropyStats | None = None  # HAPO: the previous step's entropy statistics
        self.step = 0
        self.eval_history: list[dict] = []
        if self.resume_from:
            self._restore(self.resume_from)
        self.tracker = Tracker(
            active=self.acc.is_main_process, output_dir=str(self.out_dir), project=config.logging.project,
            mode=config.logging.wandb_mode, config=OmegaConf.to_container(OmegaConf.structured(config)),
            run_name=self.out_dir.name, resume_step=self.step if self.resume_from else None,
        )
        if self.acc.is_main_process:
            save_config(config, self.out_dir / "config.yaml")

    # ----------------------------------------------------------------------------------------------- rollout
    def _local_prompt_rows(self, step: int, round_: int = 0) -> list[dict]:
        """This rank's prompts of `step`; refill rounds of dynamic sampling draw from independent shuffles, so a
        resumed run repeats them exactly."""
        r = self.config.rollout
        indices = prompts_for_step(len(self.train_rows), step=step, per_step=r.prompts_per_step,
                                   seed=self.config.trainer.seed + 1_000_033 * round_)
        per_rank = r.prompts_per_step // self.dp.num_processes
        mine = indices[self.dp.process_index * per_rank : (self.dp.process_index + 1) * per_rank]
        rows = [dict(self.train_rows[i]) for i in mine]
        keys = [row["question"] for row in rows]
        if self.effort_shaper is not None:  # e1: each prompt's effort, shown in its prompt
            for row, effort in zip(rows, self.effort_shaper.draw(keys, step, round_)):
                row["effort"] = effort
        if self.budget_shaper is not None:  # RMT: each prompt's token budget sets its generation limit
            limits = self.budget_shaper.max_new_tokens(keys, step, self.config.trainer.steps, r.max_new_tokens)
            for row, limit in zip(rows, limits):
                row["max_new_tokens"] = limit
        return rows

    def _sampling_params(self, step: int, round_: int) -> SamplingParams:
        r, h = self.config.rollout, self.config.algorithm.hapo
        seed = self.config.trainer.seed + 7919 * ((step + 104_729 * round_) * self.dp.num_processes
                                                  + self.dp.process_index)
        adaptive = None
        if h.adaptive_temperature and self.sampling_stats is not None:
            adaptive = AdaptiveTemperature(tuple(self.sampling_stats.to_list()), tau=h.temperature_tau,
                                           sign_mode=h.sign_mode)
        return SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed,
                              adaptive_temperature=adaptive, stop=tuple(r.stop))

    def _generate(self, rows: list[dict], params: SamplingParams) -> tuple[RolloutBatch, list[str]]:
        r = self.config.rollout
        prompts = [encode_prompt(self.tokenizer, with_effort(row["question"], row.get("effort")),
                                 self.config.data.template) for row in rows]
        out = self.engine.generate(prompts, params, [row.get("max_new_tokens", r.max_new_tokens) for row in rows])
        width = max(1, max(len(ids) for ids in out.completion_ids))
        n = len(out.completion_ids)
        ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        logps = torch.zeros((n, width))
        entropy = torch.zeros((n, width)) if out.entropies is not None else None
        for i, (tok, lp) in enumerate(zip(out.completion_ids, out.logprobs)):
            ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
            mask[i, : len(tok)] = True
            logps[i, : len(lp)] = torch.tensor(lp)
            if entropy is not None:
                entropy[i, : len(tok)] = torch.tensor(out.entropies[i])
        batch = RolloutBatch(
            prompt_ids=[p for p in prompts for _ in range(r.group_size)], completion_ids=ids, completion_mask=mask,
            rollout_logprobs=logps, finish_reasons=out.finish_reasons, group_size=r.group_size,
            rollout_entropy=entropy,
        )
        texts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        return batch, texts

    def _scored_round(self, step: int, round_: int) -> Scored:
        """One generation round of this rank's prompts, scored. Under sequence parallelism the group leader
        generates and scores, and the group's other ranks receive its result."""
        if self.sp is not None and self.sp.rank != 0:
            return broadcast_from_leader(None, self.sp)
        scored = self._generate_and_score(step, round_)
        return scored if self.sp is None else broadcast_from_leader(scored, self.sp)

    def _generate_and_score(self, step: int, round_: int) -> Scored:
        rows = self._local_prompt_rows(step, round_)
        batch, texts = self._generate(rows, self._sampling_params(step, round_))
        g = self.config.rollout.group_size
        columns = {key: [row[key] for row in rows for _ in range(g)] for key in rows[0]}
        scores = score_batch(self.reward_funcs, texts, columns, strict=self.config.trainer.strict_rewards,
                             logged=self.logged_reward_errors)
        return Scored(rows, batch, texts, torch.tensor(scores.total), torch.tensor(scores.valid), scores.per_func,
                      scores.errors, scores.failures)

    def _check_reward_failures(self, scored: Scored) -> None:
        """A reward that fails for every sample of a step, `trainer.max_failed_reward_steps` steps in a row, stops
        the run with its traceback: otherwise the run would exit 0 after training on nothing."""
        counts = torch.tensor([float(scored.valid.sum()), float(scored.errors)], device=self.acc.device)
        valid, errors = self.dp.reduce(counts, reduction="sum").tolist()
        self.failed_reward_steps = self.failed_reward_steps + 1 if valid == 0 and errors > 0 else 0
        limit = self.config.trainer.max_failed_reward_steps
        if self.failed_reward_steps >= limit:
            detail = "\n".join(f"{name}: {text}" for name, text in scored.failures.items()) or "(on another rank)"
            raise RewardFailureError(
                f"the reward failed for every sample on {self.failed_reward_steps} consecutive steps "
                f"(trainer.max_failed_reward_steps={limit}); the last failure:\n{detail}")

    def _collect(self, step: int) -> tuple[Scored, dict]:
        ds = self.config.algorithm.dynamic_sampling
        if not ds.enabled:
            return self._scored_round(step, 0), {}
        per_rank = self.config.rollout.prompts_per_step // self.dp.num_processes
        return dynamic_sampling(self.dp, lambda round_: self._scored_round(step, round_),
                                groups_per_rank=per_rank, cfg=ds)

    @staticmethod
    def _correct(scored: Scored) -> torch.Tensor:
        """[N] 1.0 where the answer is right: the accuracy reward when there is one, else a positive reward."""
        if "accuracy" in scored.per_func:
            return torch.tensor(scored.per_func["accuracy"]).nan_to_num(0.0).clamp(min=0.0)
        return (scored.rewards > 0).float()

    def _correct_reward(self, scored: Scored) -> torch.Tensor:
        """[N] R_correct, the part of the reward that the length gates act on: the weighted accuracy reward when
        there is one, else the whole reward (a correctness-only reward such as drqa_concise)."""
        weights = [spec.weight for spec in self.config.rewards if spec.name == "accuracy"]
        if not weights:
            return scored.rewards.float()
        values = torch.tensor(scored.per_func["accuracy"]).nan_to_num(0.0)
        return (sum(weights) * values * scored.valid).float()

    def _shape_rewards(self, scored: Scored, lengths: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The reward shapers in order (overlong, RMT budget, effort, ...)."""
        rows, g = scored.rows, self.config.rollout.group_size
        per_row = lambda key: [row[key] for row in rows for _ in range(g)] if rows and key in rows[0] else None
        efforts, limits = per_row("effort"), per_row("max_new_tokens")
        ctx = ShapingContext(
            rewards=scored.rewards.float(), correct=self._correct(scored), correct_reward=self._correct_reward(scored),
            lengths=lengths,
            truncated=torch.tensor([reason == "length" for reason in scored.batch.finish_reasons]),
            prompt_keys=per_row("question"), group_size=g, step=self.step, total_steps=self.config.trainer.steps,
            max_new_tokens=self.config.rollout.max_new_tokens,
            efforts=None if efforts is None else torch.tensor(efforts, dtype=torch.float64),
            max_tokens=None if limits is None else torch.tensor(limits), gather=self._gather_lists,
        )
        return apply_shapers(self.shapers, ctx)

    def _gather_lists(self, keys: list, values: list) -> tuple[list, list]:
        """Every data-parallel rank's (keys, values), in rank order: shaper statistics stay the same on all ranks."""
        if self.acc.num_processes == 1:
            return keys, values
        every = [None] * self.acc.num_processes
        torch.distributed.all_gather_object(every, (keys, values))
        step = 1 if self.sp is None else self.sp.size  # ranks of a sequence-parallel group hold the same rows
        pairs = every[::step]
        return [k for ks, _ in pairs for k in ks], [v for _, vs in pairs for v in vs]

    def _sampling_policy_pass(self, batch: RolloutBatch):
        """(log-probs, entropies) [N, T] of the policy that sampled the batch, by a no-grad forward. Skipped when
        nothing needs them or when the engine returned the entropies (the hf engine does)."""
        a = self.config.algorithm
        need_entropy = self.needs_entropy and batch.rollout_entropy is None
        need_logp = a.num_iterations > 1 or (a.kl_in == "reward" and self.ref_model is not None)
        if not (need_entropy or need_logp):
            return None, batch.rollout_entropy
        logp, entropy = self._frozen_logprobs(self.model, batch)
        return (logp if need_logp else None), (entropy if batch.rollout_entropy is None else batch.rollout_entropy)

    def _frozen_logprobs(self, model, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad (log-probs, entropies) [N, T] of every non-empty row, micro-batched as the training step is."""
        o = self.config.optim
        rows = batch.completion_mask.any(-1).nonzero().squeeze(-1)
        return fixed_logprobs(model, batch, rows, pad_id=self.tokenizer.pad_token_id,
                              temperature=self.config.rollout.temperature, micro_batch_size=o.micro_batch_size,
                              token_budget=o.micro_batch_tokens, packed=o.packing, lockstep_acc=lockstep_acc(self.acc),
                              sequence_parallel=self.sp)

    def _kl_reward_penalty(self, batch: RolloutBatch, old_logp: torch.Tensor) -> torch.Tensor:
        ref_logp, _ = self._frozen_logprobs(self.ref_model, batch)
        per_token = kl_estimate(old_logp, ref_logp, self.config.algorithm.kl_estimator)
        return kl_reward_penalty(per_token, batch.completion_mask, coef=self.config.algorithm.kl_coef)

    def _rollout_is(self) -> dict | None:
        r = self.config.rollout
        on = r.engine != "hf" if r.is_correction is None else r.is_correction
        return {"level": r.is_level, "mode": r.is_mode, "cap": r.is_cap, "floor": r.is_floor} if on else None

    # ---------------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, acc = self.config, self.dp
        a, g = cfg.algorithm, cfg.rollout.group_size
        t0 = time.perf_counter()
        scored, extra = self._collect(self.step)
        grader_errors = take_grader_errors()
        self._check_reward_failures(scored)
        if getattr(self.engine, "sleep_enabled", False):  # colocated vLLM on GPU: free its memory for training
            self.engine.sleep(level=1)
            self.engine_asleep = True
        batch, valid = scored.batch, scored.valid
        t1 = time.perf_counter()
        lengths = batch.completion_mask.sum(-1).float()
        rewards, shaping_metrics = self._shape_rewards(scored, lengths)
        extra.update(shaping_metrics)
        old_logp, entropy = self._sampling_policy_pass(batch)
        if a.hapo.adaptive_temperature and self.sampling_stats is not None and entropy is not None:
            extra.update(adaptive_temperature_metrics(  # self.sampling_stats: still the ones this batch used
                acc, entropy, batch.completion_mask, stats=self.sampling_stats, base_temperature=cfg.rollout.temperature,
                tau=a.hapo.temperature_tau, sign_mode=a.hapo.sign_mode))
        if a.kl_in == "reward" and self.ref_model is not None:
            kl_penalty = self._kl_reward_penalty(batch, old_logp)
            rewards = rewards - kl_penalty.to(rewards)
            extra["reward/kl_penalty"] = _nanmean_across(acc, kl_penalty)
        # Advantages use every rank's rewards (group or batch statistics); all ranks compute the same global vector.
        all_rewards, all_valid, all_lengths = acc.gather(rewards), acc.gather(valid), acc.gather(lengths)
        all_adv, adv_metrics = compute_advantages(
            all_rewards, estimator=a.advantage, group_size=g, valid=all_valid, lengths=all_lengths, eps=a.std_eps,
            unbiased_std=a.unbiased_std, scale=a.scale_rewards, fallback_threshold=a.hapo.fallback_threshold,
        )
        sample_keep, token_keep = d3s_keep_fractions(a.d3s, step=self.step, total_steps=cfg.trainer.steps)
        keep_all = d3s_rollout_keep(all_adv, a.d3s, keep_fraction=sample_keep, group_size=g)
        n_local, start = rewards.numel(), acc.process_index * rewards.numel()
        advantages, keep = all_adv[start : start + n_local], keep_all[start : start + n_local]
        batch.loss_mask = loss_mask_for(batch, valid, mask_truncated=a.overlong.mask_truncated) & keep[:, None]
        before_tokens = batch.loss_mask.sum()
        if token_keep < 1:
            batch.loss_mask = d3s_token_mask(acc, advantages, entropy, batch.loss_mask, keep_fraction=token_keep,
                                             scope=a.d3s.token_scope)
        after_d3s_tokens = batch.loss_mask.sum()
        if a.rmt.curriculum:  # RMT: RL on a share of the tokens, from low to high entropy over training
            batch.loss_mask = select_curriculum_tokens(
                entropy, batch.loss_mask & batch.completion_mask, self.step / max(cfg.trainer.steps - 1, 1),
                fraction=a.rmt.token_fraction, start=a.rmt.target_start, end=a.rmt.target_end, width=a.rmt.width,
                generator=torch.Generator().manual_seed(cfg.trainer.seed * 7_919 + self.step))
        ntp_weight = linear_schedule(self.step, max(cfg.trainer.steps - 1, 1), start=a.rmt.ntp_weight_start,
                                     end=a.rmt.ntp_weight_end)
        if ntp_weight:  # RMT dual loss: next-token prediction on every token of the chosen completions
            rows = valid & (self._correct(scored) > 0) if a.rmt.ntp_rows == "correct" else valid
            batch.ntp_mask = batch.completion_mask & rows[:, None]
            extra["rmt/ntp_weight"] = ntp_weight
        h_hat = None
        if _uses_hapo_entropy(a):
            stats = hapo_entropy_stats(acc, entropy, batch.completion_mask & valid[:, None], pivot=a.hapo.entropy_pivot)
            if a.hapo.adaptive_clip or a.hapo.redistribution:
                h_hat = hapo_h_hat(entropy, stats, sign_mode=a.hapo.sign_mode)
            self.sampling_stats = stats  # the next step samples with these (adaptive temperature)
            extra.update({"hapo/entropy_pivot": stats.m, "hapo/entropy_rms": stats.sigma})
        t2 = time.perf_counter()
        train_metrics = train_on_batch(
            self.model, self.optimizer, self.scheduler, acc, batch, advantages,
            algo=a, optim=cfg.optim, pad_id=self.tokenizer.pad_token_id, temperature=cfg.rollout.temperature,
            norm_constant=a.loss_norm_constant or cfg.rollout.max_new_tokens, ref_model=self.ref_model,
            old_logp=old_logp, h_hat=h_hat, rollout_is=self._rollout_is(), rl_weight=a.rmt.rl_weight,
            ntp_weight=ntp_weight,
        )
        self._advance_schedule()
        sync_metrics = self._sync_weights(batch, check=_due(self.step + 1, cfg.rollout.sync_check_every))
        t3 = time.perf_counter()
        self.step += 1

        sums = {
            "completion/len_sum": lengths.sum(), "completion/clipped": torch.tensor(
                float(sum(reason == "length" for reason in batch.finish_reasons))),
            "reward/errors": torch.tensor(float(scored.errors)), "reward/invalid": (~valid).sum().float(),
            "reward/grader_errors": torch.tensor(float(grader_errors)),
            "tokens/before_d3s": before_tokens.float(), "tokens/after_d3s": after_d3s_tokens.float(),
            "tokens/trained": batch.loss_mask.sum().float(),
            "rows/kept": keep.sum().float(),
        }
        reduced = {k: acc.reduce(v.float().to(acc.device), reduction="sum").item() for k, v in sums.items()}
        max_len = acc.reduce(lengths.max().to(acc.device), reduction="max").item()
        n_all = all_rewards.numel()
        metrics = {
            **group_stats(all_rewards, all_valid, g),
            "completion/len_mean": reduced["completion/len_sum"] / n_all,
            "completion/len_max": max_len,
            "completion/clipped_frac": reduced["completion/clipped"] / n_all,
            "reward/errors": reduced["reward/errors"],
            "reward/grader_errors": reduced["reward/grader_errors"],
            "reward/invalid": reduced["reward/invalid"],
            **{f"reward/{name}": _nanmean_across(acc, torch.tensor(v)) for name, v in scored.per_func.items()},
            **adv_metrics,
            **extra,
            "d3s/sample_keep_frac": reduced["rows/kept"] / n_all,
            "d3s/token_keep_frac": reduced["tokens/after_d3s"] / max(reduced["tokens/before_d3s"], 1.0),
            "train/loss_tokens": reduced["tokens/trained"],
            **train_metrics,
            **sync_metrics,
            "time/generate": t1 - t0, "time/prepare": t2 - t1, "time/train": t3 - t2, "time/step": t3 - t0,
            "throughput/gen_tokens_per_s": reduced["completion/len_sum"] / max(t1 - t0, 1e-9),
        }
        if self.step % cfg.logging.sample_table_every == 0 or self.step == 1:
            self.tracker.log_samples(self.step, [
                {"prompt": row["question"], "answer": row["answer"], "completion": scored.texts[i * g],
                 "reward": float(rewards[i * g])} for i, row in enumerate(scored.rows[:4])
            ])
        return metrics

    def _advance_schedule(self) -> None:
        """One schedule step per trainer step, trained or skipped: the schedule spans trainer.steps whatever
        algorithm.num_iterations is, and a skipped step does not shift the decay. (torch warns when a schedule
        steps before the optimizer has: that is a skipped first step here, and intended.)"""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()

    def _sync_weights(self, batch: RolloutBatch | None = None, *, check: bool = False) -> dict:
        """Push the policy's weights into the rollout engine (a no-op for hf, which generates with the policy) and,
        when `check`, verify with a parity probe that the engine now scores like the trainer."""
        r = self.config.rollout
        if r.engine == "hf":
            return {}
        t0 = time.perf_counter()
        pushes = r.engine != "server" or self.acc.is_main_process  # one push per server, by the main process
        if self.engine_asleep:
            self.engine.wake_up(["weights"])  # weights first, KV cache after the push: a lower peak
        if self.config.model.lora.enabled:  # the engine holds the plain model: push W + scale * B @ A
            weights = lora.merged_named_parameters(self.policy)
        else:
            weights = full_named_parameters(self.policy, self.zero)  # under ZeRO-3 gathered bucket by bucket
        if pushes:
            self.engine.load_weights(weights)
        elif self.zero == 3:  # the gathers are collective: ranks that do not push take part all the same
            for _ in weights:
                pass
        if self.engine_asleep:
            self.engine.wake_up(["kv_cache"])
            self.engine_asleep = False
        if r.engine == "server":
            self.acc.wait_for_everyone()  # no rank generates from the server before the push is complete
        metrics = {"time/weight_sync": time.perf_counter() - t0}
        if check and (pushes or self.zero == 3) and batch is not None:  # ZeRO-3: the trainer's forward is collective
            engine_dtype = getattr(self.engine, "dtype", None) or self.config.model.dtype
            tol = r.sync_check_tol if r.sync_check_tol is not None else default_tolerance(engine_dtype)
            metrics.update(check_weight_sync(self.engine, self.policy, batch, pad_id=self.tokenizer.pad_token_id,
                                             tolerance=tol, step=self.step + 1))
        return metrics

    # ----------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        mine = self.eval_rows[self.dp.process_index :: self.dp.num_processes]
        scored = len(mine)
        if self.zero == 3 and self.config.rollout.engine == "hf" and mine:  # generation runs in lockstep: equal rows
            mine = mine + mine[:1] * (math.ceil(len(self.eval_rows) / self.acc.num_processes) - len(mine))
        t0 = time.perf_counter()
        take_grader_errors()  # the step's count was logged with the step
        result = greedy_accuracy(
            self.engine, self.tokenizer, mine, template=self.config.data.template,
            max_new_tokens=self.config.trainer.eval_max_new_tokens, num_scored=scored,
        )
        counts = torch.tensor([result["correct"], result["n"], result["tokens"], take_grader_errors()])
        correct, n, tokens, grader_errors = self.dp.reduce(counts, reduction="sum").tolist()
        record = {"step": self.step, "accuracy": correct / max(n, 1), "mean_length": tokens / max(n, 1), "n": n,
                  "seconds": time.perf_counter() - t0}
        self.eval_history.append(record)
        self.tracker.log_samples(self.step, result["samples"][:8])
        return {"eval/accuracy": record["accuracy"], "eval/mean_length": record["mean_length"],
                "eval/grader_errors": grader_errors}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        acc = self.acc
        stage = ckpt.staging_dir(self.out_dir, self.step)
        if acc.is_main_process:
            stage.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        ckpt.write_rank_files(stage, acc.process_index)
        # one layout-free optimizer state (gathered from the ZeRO shards), so any process count can resume it
        optimizer_state = portable_optimizer_state(self.optimizer, self._trainable(), self.zero)
        state_dict = acc.get_state_dict(self.model) if self.zero == 3 else None  # gathered by DeepSpeed
        if acc.is_main_process:
            state = {
                "step": self.step, "prompts_seen": self.step * self.config.rollout.prompts_per_step,
                "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "eval_history": self.eval_history, "num_processes": acc.num_processes,
                "sampling_stats": None if self.sampling_stats is None else self.sampling_stats.to_list(),
                "shapers": [x.state_dict() if hasattr(x, "state_dict") else None for x in self.shapers],
            }
            ckpt.write_main_files(stage, model=self.policy, tokenizer=self.tokenizer, trainer_state=state,
                                  state_dict=state_dict)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(self.out_dir, self.step, self.config.trainer.keep_last)
        acc.wait_for_everyone()

    def _restore(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        load_portable_optimizer_state(self.optimizer, self._trainable(), self.zero, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
        if state.get("sampling_stats") is not None:
            self.sampling_stats = EntropyStats.from_list(state["sampling_stats"])
        for shaper, saved in zip(self.shapers, state.get("shapers", [])):
            if saved is not None:
                shaper.load_state_dict(saved)
        rng = ckpt.load_rank_rng(path, self.acc.process_index)
        if rng is not None:
            ckpt.set_rng_state(rng)
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.step} (prompts seen: {state['prompts_seen']})", flush=True)

    # ------------------------------------------------------------------------------------------------ loop
    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.config.trainer
        show = self.acc.is_main_process
        if cfg.eval_at_start and self.step == 0 and self.eval_rows:
            self.tracker.log(0, self.evaluate(), console=tqdm.write)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="GRPO", disable=not show, dynamic_ncols=True)
        with PreemptionWatch() as watch:
            while self.step < cfg.steps:
                metrics = self.train_step()
                last = self.step == cfg.steps
                if self.eval_rows and (last or _due(self.step, cfg.eval_every)):
                    metrics.update(self.evaluate())
                self.tracker.log(self.step, metrics, console=tqdm.write)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
                saved = last or _due(self.step, cfg.save_every)
                if saved:
                    self.save()
                if not last and watch.requested(self.acc):
                    if not saved:
                        self.save()
                    self.preempted_by = watch.signal_name
                    tqdm.write(f"{self.preempted_by} received: stopped after step {self.step} with a checkpoint in "
                               f"{self.out_dir}; run the same command with trainer.resume=auto to continue")
                    break
        bar.close()
        in_sync = self.ranks_hold_identical_parameters()
        if show:
            summary = {"eval_history": self.eval_history, "steps": self.step, "num_processes": self.acc.num_processes,
                       "ranks_identical": in_sync}
            (self.out_dir / "eval_results.json").write_text(json.dumps(summary, indent=2))
            if self.eval_history:
                first, final = self.eval_history[0], self.eval_history[-1]
                tqdm.write(f"greedy accuracy: step {first['step']} {first['accuracy']:.1%} -> "
                           f"step {final['step']} {final['accuracy']:.1%} on {int(final['n'])} held-out problems")
        self.tracker.finish()
        if not in_sync:
            raise RuntimeError("the processes hold different parameters after training: data parallelism is broken")
        return self.eval_history

    def close(self) -> None:
        """Shut the rollout engine down (vLLM's in-process engine holds memory and a process group)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def _trainable(self) -> list:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def ranks_hold_identical_parameters(self) -> bool:
        """Exact comparison of per-tensor float64 sums and absolute sums across processes."""
        local = fingerprint(self.policy.parameters(), self.zero).to(self.acc.device)
        every_rank = self.acc.gather(local[None])  # [world, 2 * num_tensors]
        return bool((every_rank == every_rank[0]).all())


def _due(step: int, every: int) -> bool:
    """Whether an every-N-steps action (eval, save, sync check) runs after `step`; N = 0 means never."""
    return every > 0 and step % every == 0


def _nanmean_across(acc, values: torch.Tensor) -> float:
    finite = ~torch.isnan(values)
    both = torch.stack([torch.where(finite, values, 0.0).sum(), finite.sum().float()])
    total, count = acc.reduce(both, reduction="sum").tolist()
    return total / count if count else math.nan


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="reasonrl.trainers.grpo", description=__doc__)
    parser.add_argument("--config", help="recipe YAML", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.steps=5")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    recipe, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    random.seed(config.trainer.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file weight loading bars drown the training progress bar
    try:
        trainer = GRPOTrainer(config)
        try:
            trainer.run()
        finally:
            trainer.close()
        leave_process_group()
    except ConfigError as err:  # a rule that needs the process count or the loaded pieces (validate, engines)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a peer died or stalled: say so instead of a bare gloo/NCCL trace
        if not is_peer_failure(err):
            raise
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
        print(f"rank {rank}: a collective operation failed, so another process of this job died or stopped "
              f"responding (see its log); trainer.collective_timeout_s={config.trainer.collective_timeout_s}. "
              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr, flush=True)
        return 1
    return PREEMPTED_EXIT_CODE if trainer.preempted_by else 0


if __name__ == "__main__":
    sys.exit(main())
