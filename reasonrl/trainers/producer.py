"""The producer half of a step: prompts -> completions (the rollout engine) -> rewards -> shaped rewards.

It owns the engine, the reward functions and the shapers, and never looks at the loss. `next_batch(step)` returns
one `ProducedBatch`; `publish(weights)` puts the learner's new weights into the engine. Synchronous training calls
the two in turn; the engine is only ever reached through the rollout protocol (reasonrl/rollout/base.py).

Asynchronous training (reasonrl/trainers/pipeline.py) splits a step's first round in two: `plan` (this step's
prompts and sampling parameters, in the main thread, from the state of the moment) and `generate_and_score` (the
engine and the reward functions, in a worker thread: no collective operation); `next_batch(step, first=...)` then
does the rest in the main thread as in synchronous training: samples older than `rollout.max_staleness` versions
dropped or generated again, DAPO's refill rounds (with the newest weights), the reward-failure check, the shapers.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import torch

from reasonrl.batch import RolloutBatch, right_padded
from reasonrl.data.effort import with_effort
from reasonrl.data.prompts import encode_prompt
from reasonrl.envs.trajectories import episode_batch, episode_metrics, episode_record, episode_sums
from reasonrl.rewards.combine import RewardFailureError, resolve_reward, score_batch
from reasonrl.rewards.math import take_grader_errors
from reasonrl.rl.hapo import EntropyStats
from reasonrl.rl.shapers import BudgetShaper, EffortShaper, ShapingContext, apply_shapers
from reasonrl.rl.staleness import stale_rows
from reasonrl.rollout.base import AdaptiveTemperature, SamplingParams
from reasonrl.trainers.collect import Scored, concat_scored, dynamic_sampling
from reasonrl.trainers.data_order import prompts_for_step
from reasonrl.trainers.sequence_parallel import broadcast_from_leader
from reasonrl.trainers.sync_check import check_weight_sync, default_tolerance
from reasonrl.trainers.validation import build_reward_shapers


@dataclass
class ProducedBatch:
    """One step's scored rollouts of this rank, as the learner receives them."""

    step: int
    scored: Scored  # rows, completions, raw rewards, validity
    rewards: torch.Tensor  # [N] after the shapers
    lengths: torch.Tensor  # [N] completion tokens
    sampled_with: EntropyStats | None  # HAPO statistics the adaptive temperature sampled with (None: plain T)
    grader_errors: int
    seconds: float  # generation and scoring
    metrics: dict = field(default_factory=dict)  # dynamic sampling and shaping


@dataclass(frozen=True)
class Plan:
    """What one generation round samples: this rank's prompt rows (with their effort and token budget) and the
    sampling parameters (seeded by step and round)."""

    step: int
    rows: list[dict]
    params: SamplingParams


REGENERATE_ROUND = 1_000  # the seed offset of samples generated again (rollout.stale=regenerate)


def correct_indicator(scored: Scored) -> torch.Tensor:
    """[N] 1.0 where the answer is right: the accuracy reward when there is one, else a positive reward."""
    if "accuracy" in scored.per_func:
        return torch.tensor(scored.per_func["accuracy"]).nan_to_num(0.0).clamp(min=0.0)
    return (scored.rewards > 0).float()


class Producer:
    def __init__(self, config, *, engine, tokenizer, train_rows: list[dict], acc, dp, sp=None, zero=None,
                 episodes=None):
        self.config, self.engine, self.tokenizer, self.train_rows = config, engine, tokenizer, train_rows
        self.episodes = episodes  # the EpisodeRunner of a recipe with an environment (reasonrl/envs), else None
        self.acc, self.dp, self.sp, self.zero = acc, dp, sp, zero
        self.reward_funcs = [(spec.name, functools.partial(resolve_reward(spec.name), **spec.args), spec.weight)
                             for spec in config.rewards]
        self.logged_reward_errors: set[str] = set()
        self.failed_reward_steps = 0  # consecutive steps on which no sample got a reward
        self.shapers = build_reward_shapers(config)
        self.budget_shaper = next((x for x in self.shapers if isinstance(x, BudgetShaper)), None)
        self.effort_shaper = next((x for x in self.shapers if isinstance(x, EffortShaper)), None)
        self.sampling_stats: EntropyStats | None = None  # HAPO: the learner's latest entropy statistics
        self.engine_asleep = False
        self.version = 0  # the policy version of the engine's weights (pushes so far, counted in trainer steps)
        self.planned_with: dict[int, EntropyStats | None] = {}  # the HAPO statistics each step's first round used

    # ------------------------------------------------------------------------------------------------ batches
    def next_batch(self, step: int, first: Scored | None = None) -> ProducedBatch:
        """Step `step`'s batch; `first`: its first round, generated ahead (asynchronous training), else generated
        now."""
        t0 = time.perf_counter()
        scored, metrics = self.collect(step, first)
        self._check_reward_failures(scored)
        if getattr(self.engine, "sleep_enabled", False):  # colocated vLLM on GPU: free its memory for training
            self.engine.sleep(level=1)
            self.engine_asleep = True
        seconds = time.perf_counter() - t0
        lengths = scored.batch.model_mask().sum(-1).float()  # the model's tokens (an episode's, over its turns)
        rewards, shaping_metrics = self.shape_rewards(scored, lengths, step)
        if scored.episodes is not None:
            sums = self.dp.reduce(episode_sums(scored.episodes).float().to(self.acc.device), reduction="sum")
            metrics.update(episode_metrics(sums.cpu()))
        sampled_with = self.planned_with.pop(step, self.sampling_stats)  # (a round restored from a checkpoint: now)
        return ProducedBatch(step, scored, rewards, lengths, sampled_with, scored.grader_errors, seconds,
                             {**metrics, **shaping_metrics})

    def collect(self, step: int, first: Scored | None = None) -> tuple[Scored, dict]:
        """This rank's scored groups of `step`: one round, or DAPO dynamic sampling's rounds (its refills are
        generated now, with the newest weights)."""
        metrics = {}
        if first is not None:
            first, metrics = self.within_staleness(step, first)
        ds = self.config.algorithm.dynamic_sampling
        if not ds.enabled:
            return (self._scored_round(step, 0) if first is None else first), metrics
        per_rank = self.config.rollout.prompts_per_step // self.dp.num_processes
        round_fn = lambda round_: first if round_ == 0 and first is not None else self._scored_round(step, round_)
        scored, ds_metrics = dynamic_sampling(self.dp, round_fn, groups_per_rank=per_rank, cfg=ds)
        return scored, {**metrics, **ds_metrics}

    def plan(self, step: int, round_: int = 0) -> Plan:
        """This rank's prompts of `step`'s round `round_` and their sampling parameters, from the current state
        (shaper statistics, HAPO entropy statistics)."""
        if round_ == 0:
            self.planned_with[step] = self.sampling_stats
        return Plan(step, self._local_prompt_rows(step, round_), self._sampling_params(step, round_))

    def generate_and_score(self, plan: Plan) -> Scored:
        """The plan's completions, scored: the engine and the reward functions only (safe in a worker thread)."""
        g = self.config.rollout.group_size
        columns = {key: [row[key] for row in plan.rows for _ in range(g)] for key in plan.rows[0]}
        records = None
        if self.episodes is None:
            batch, texts = self._generate(plan.rows, plan.params)
        else:
            batch, texts, records = self._run_episodes(plan.rows, plan.params)
            columns["env_reward"] = [r.pop("reward") for r in records]
        scores = score_batch(self.reward_funcs, texts, columns, strict=self.config.trainer.strict_rewards,
                             logged=self.logged_reward_errors)
        return Scored(plan.rows, batch, texts, torch.tensor(scores.total), torch.tensor(scores.valid),
                      scores.per_func, scores.errors, scores.failures, grader_errors=take_grader_errors(),
                      episodes=records)

    def within_staleness(self, step: int, scored: Scored) -> tuple[Scored, dict]:
        """`scored` without its samples older than `rollout.max_staleness` versions at learner version `step`:
        dropped (invalid, so neither advantages nor the loss see them) or, with `rollout.stale=regenerate`, their
        groups generated again now."""
        r = self.config.rollout
        batch = scored.batch
        stale = stale_rows(batch.token_versions, batch.model_mask(), learner_version=step,
                           max_staleness=r.max_staleness)
        count = torch.tensor([float(stale.sum())], device=self.acc.device)
        metrics = {"async/dropped": 0.0, "async/regenerated": 0.0}
        key = "async/regenerated" if r.stale == "regenerate" else "async/dropped"
        metrics[key] = float(self.dp.reduce(count, reduction="sum").item())
        if not bool(stale.any()):
            return scored, metrics
        if r.stale == "drop":
            scored.valid = scored.valid & ~stale
            return scored, metrics
        g = r.group_size
        old = sorted({int(i) // g for i in stale.nonzero().squeeze(-1).tolist()})
        fresh = [i for i in range(len(scored.rows)) if i not in old]
        params = self._sampling_params(step, REGENERATE_ROUND)
        again = self.generate_and_score(Plan(step, [scored.rows[i] for i in old], params))
        return (concat_scored([scored.select_groups(fresh), again]) if fresh else again), metrics

    def _scored_round(self, step: int, round_: int) -> Scored:
        """One generation round of this rank's prompts, scored. Under sequence parallelism the group leader
        generates and scores, and the group's other ranks receive its result."""
        if self.sp is not None and self.sp.rank != 0:
            return broadcast_from_leader(None, self.sp)
        scored = self._generate_and_score(step, round_)
        return scored if self.sp is None else broadcast_from_leader(scored, self.sp)

    def _generate_and_score(self, step: int, round_: int) -> Scored:
        return self.generate_and_score(self.plan(step, round_))

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
        pad = functools.partial(right_padded, width=width)
        ids = pad(out.completion_ids, fill=self.tokenizer.pad_token_id)
        mask = pad([[True] * len(tok) for tok in out.completion_ids], fill=False, dtype=torch.bool)
        logps = pad(out.logprobs, fill=0.0, dtype=torch.float32)
        entropy = None if out.entropies is None else pad(out.entropies, fill=0.0, dtype=torch.float32)
        # engines without versions: the current one
        versions = pad([[self.version] * len(tok) for tok in out.completion_ids] if out.versions is None
                       else out.versions, fill=self.version)
        batch = RolloutBatch(
            prompt_ids=[p for p in prompts for _ in range(r.group_size)], completion_ids=ids, completion_mask=mask,
            rollout_logprobs=logps, finish_reasons=out.finish_reasons, group_size=r.group_size,
            rollout_entropy=entropy, token_versions=versions,
        )
        texts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        return batch, texts

    def _run_episodes(self, rows: list[dict], params: SamplingParams) -> tuple[RolloutBatch, list[str], list[dict]]:
        """The rows' episodes (G each) with the environment: their batch, the model's text of each (what the
        reward functions grade) and per-episode records (with the environment's own reward)."""
        g = self.config.rollout.group_size
        episodes = self.episodes.run(self.engine, rows, params, group_size=g, version=self.version)
        batch = episode_batch(episodes, pad_id=self.tokenizer.pad_token_id, group_size=g)
        records = [{**episode_record(e, self.tokenizer), "reward": e.reward} for e in episodes]
        return batch, [e.model_text() for e in episodes], records

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

    # ------------------------------------------------------------------------------------------------ shaping
    def shape_rewards(self, scored: Scored, lengths: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The reward shapers in order (overlong, RMT budget, effort, ...)."""
        rows, g = scored.rows, self.config.rollout.group_size
        per_row = lambda key: [row[key] for row in rows for _ in range(g)] if rows and key in rows[0] else None
        efforts, limits = per_row("effort"), per_row("max_new_tokens")
        ctx = ShapingContext(
            rewards=scored.rewards.float(), correct=correct_indicator(scored),
            correct_reward=self._correct_reward(scored), lengths=lengths,
            truncated=torch.tensor([reason == "length" for reason in scored.batch.finish_reasons]),
            prompt_keys=per_row("question"), group_size=g, step=step, total_steps=self.config.trainer.steps,
            max_new_tokens=self.config.rollout.max_new_tokens,
            efforts=None if efforts is None else torch.tensor(efforts, dtype=torch.float64),
            max_tokens=None if limits is None else torch.tensor(limits), gather=self._gather_lists,
        )
        return apply_shapers(self.shapers, ctx)

    def _correct_reward(self, scored: Scored) -> torch.Tensor:
        """[N] R_correct, the part of the reward that the length gates act on: the weighted accuracy reward when
        there is one, else the whole reward (a correctness-only reward such as drqa_concise)."""
        weights = [spec.weight for spec in self.config.rewards if spec.name == "accuracy"]
        if not weights:
            return scored.rewards.float()
        values = torch.tensor(scored.per_func["accuracy"]).nan_to_num(0.0)
        return (sum(weights) * values * scored.valid).float()

    def _gather_lists(self, keys: list, values: list) -> tuple[list, list]:
        """Every data-parallel rank's (keys, values), in rank order: shaper statistics stay the same on all ranks."""
        if self.acc.num_processes == 1:
            return keys, values
        every = [None] * self.acc.num_processes
        torch.distributed.all_gather_object(every, (keys, values))
        step = 1 if self.sp is None else self.sp.size  # ranks of a sequence-parallel group hold the same rows
        pairs = every[::step]
        return [k for ks, _ in pairs for k in ks], [v for _, vs in pairs for v in vs]

    # ---------------------------------------------------------------------------------------------- weights
    def publish(self, weights, *, probe_policy=None, batch: RolloutBatch | None = None, step: int = 0) -> dict:
        """Push `weights` ((name, tensor) pairs; under ZeRO-3 gathered bucket by bucket, a collective) into the
        engine (a no-op for hf, which generates with the policy itself) and, with `probe_policy` and `batch`,
        check with a parity probe that the engine now scores like that policy."""
        r = self.config.rollout
        self.version = step
        if r.engine == "hf":
            return {}
        t0 = time.perf_counter()
        gate = getattr(self.engine, "gate", None)  # engines that record token versions (server)
        with contextlib.nullcontext() if gate is None else gate.update(step):
            self._push(weights)
        metrics = {"time/weight_sync": time.perf_counter() - t0}
        probe = probe_policy is not None and batch is not None and (self._pushes() or self.zero == 3)  # ZeRO-3: collective
        if probe:
            engine_dtype = getattr(self.engine, "dtype", None) or self.config.model.dtype
            tol = r.sync_check_tol if r.sync_check_tol is not None else default_tolerance(engine_dtype)
            metrics.update(check_weight_sync(self.engine, probe_policy, batch, pad_id=self.tokenizer.pad_token_id,
                                             tolerance=tol, step=step))
        return metrics

    def _push(self, weights) -> None:
        """The push itself (the engine's generation paused by the caller)."""
        r = self.config.rollout
        pushes = self._pushes()
        if r.engine == "server" and r.max_staleness:  # every rank's generation paused before the server changes
            self.acc.wait_for_everyone()
        if self.engine_asleep:
            self.engine.wake_up(["weights"])  # weights first, KV cache after the push: a lower peak
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

    def _pushes(self) -> bool:
        """Whether this rank pushes: every rank into its own in-process engine, the main process into the server."""
        return self.config.rollout.engine != "server" or self.acc.is_main_process

    def state_dict(self) -> dict:
        return {"sampling_stats": None if self.sampling_stats is None else self.sampling_stats.to_list(),
                "shapers": [x.state_dict() if hasattr(x, "state_dict") else None for x in self.shapers]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling_stats") is not None:
            self.sampling_stats = EntropyStats.from_list(state["sampling_stats"])
        for shaper, saved in zip(self.shapers, state.get("shapers", [])):
            if saved is not None:
                shaper.load_state_dict(saved)

    def close(self) -> None:
        """Shut the rollout engine down (vLLM's in-process engine holds memory and a process group)."""
        if self.episodes is not None:
            self.episodes.close()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
