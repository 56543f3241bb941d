"""GRPO-family trainer: generate -> score -> shape -> advantages -> down-sample -> policy loss, one process or many.

The algorithm (GRPO, Dr.GRPO, RLOO, DAPO, HAPO, D3S and their parts) is chosen in the recipe's `algorithm` section.

Run it as `accelerate launch -m reasonrl.trainers.grpo --config recipes/X.yaml key=value ...`
or `reasonrl train recipes/X.yaml key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from reasonrl.config import ConfigError, RecipeConfig, load_config, save_config
from reasonrl.data.tasks import task_rows
from reasonrl.envs import build_runner, load_environment
from reasonrl.malloc_tuning import tune_malloc
from reasonrl.models import load_autocast_model, load_policy, load_tokenizer, resolve_model_path
from reasonrl.precision import resolve_precision
from reasonrl.rewards.math import take_grader_errors
from reasonrl.rollout.factory import build_engine, eos_token_ids
from reasonrl.trainers import checkpoint as ckpt
from reasonrl.trainers import lora
from reasonrl.trainers.distributed import (
    build_accelerator,
    check_launch_precision,
    configure_deepspeed,
    fingerprint,
    is_peer_failure,
    leave_process_group,
    load_master_weights,
    load_portable_optimizer_state,
    master_weights,
    portable_optimizer_state,
    sharded_inference_engine,
    zero_stage,
)
from reasonrl.trainers.evaluate import episode_accuracy, greedy_accuracy
from reasonrl.trainers.learner import Learner, nanmean_across
from reasonrl.trainers.optimization import build_optimizer, build_scheduler
from reasonrl.trainers.pipeline import ProducerThread, load_results, save_results
from reasonrl.trainers.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from reasonrl.trainers.preemption import PreemptionWatch
from reasonrl.trainers.producer import Producer
from reasonrl.trainers.sequence_parallel import DataParallelView, build_sequence_parallel
from reasonrl.trainers.step import group_stats
from reasonrl.trainers.tracking import Tracker
from reasonrl.trainers.validation import validate


class GRPOTrainer:
    def __init__(self, config: RecipeConfig, accelerator: Accelerator | None = None):
        self.config = config
        self.acc = accelerator or build_accelerator(config.trainer.collective_timeout_s)
        self.zero = zero_stage(self.acc)  # DeepSpeed ZeRO stage, None without DeepSpeed
        validate(config, self.acc.num_processes)
        check_launch_precision(self.acc)
        self.precision = resolve_precision(config.model.dtype, self.acc.device)
        config.model.dtype = self.precision.dtype  # every reader (engines, tolerances) sees what runs
        if self.acc.is_main_process:
            print(self.precision.describe(), flush=True)
        # sequence parallelism: groups of ranks share rows; `self.dp` is the accelerator as the data sees it
        self.sp = build_sequence_parallel(self.acc.num_processes, self.acc.process_index, config.model.sparse_attention)
        if self.sp is not None and self.zero == 3:
            raise ConfigError("model.sparse_attention.sequence_parallel > 1 is not supported with ZeRO-3 (use ZeRO-2)")
        self.dp = self.acc if self.sp is None else DataParallelView(self.acc, self.sp)
        self.out_dir = Path(config.trainer.output_dir)
        set_seed(config.trainer.seed)

        self.env = None if config.env.source == "none" else load_environment(config.env.source, config.env.id,
                                                                               config.env.args)
        self.train_rows, self.eval_rows = task_rows(config, self.env)

        with self.acc.main_process_first():  # the built-in model is converted once, by the main process
            self.model_path = resolve_model_path(config.model.name_or_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.resume_from = ckpt.latest_checkpoint(self.out_dir) if config.trainer.resume == "auto" else None
        lora_on = config.model.lora.enabled  # LoRA: the base weights always come from model_path
        policy_path = str(self.resume_from / "model") if self.resume_from and not lora_on else self.model_path
        self._prepare_training(policy_path)
        self.engine = build_engine(
            config.rollout, model=self.policy, tokenizer=self.tokenizer, model_path=policy_path,
            model_dtype=self.precision.dtype, seed=config.trainer.seed,
        )
        if self.zero == 3 and hasattr(self.engine, "synced_gpus"):
            self.engine.synced_gpus = True
        self.episodes = None if self.env is None else build_runner(
            config.env, env=self.env, tokenizer=self.tokenizer, eos_ids=eos_token_ids(self.tokenizer, self.policy),
            template=config.data.template, max_new_tokens=config.rollout.max_new_tokens)
        self.producer = Producer(config, engine=self.engine, tokenizer=self.tokenizer, train_rows=self.train_rows,
                                 acc=self.acc, dp=self.dp, sp=self.sp, zero=self.zero, episodes=self.episodes)
        self.learner = Learner(config, acc=self.acc, dp=self.dp, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, ref_model=self.ref_model, pad_id=self.tokenizer.pad_token_id,
                               sp=self.sp, zero=self.zero)
        self.preempted_by: str | None = None  # the signal that stopped the run early, if any
        if hasattr(self.engine, "return_entropy"):  # free with the hf engine; others need an old-policy pass
            self.engine.return_entropy = self.learner.stages.entropy
        self.step = 0
        self.eval_history: list[dict] = []
        # asynchronous training: a worker thread generates up to max_staleness steps ahead (pipeline.py)
        self.ahead = ProducerThread(self.producer.generate_and_score) if config.rollout.max_staleness else None
        self.planned_through = -1  # the last step whose first round was planned (asynchronous training)
        self.producer_idle_mark = 0.0
        if self.resume_from:
            self._restore(self.resume_from)
        # the server (and a resumed LoRA run's vllm engine) starts from the base model; it must sample from ours
        if config.rollout.engine == "server" or (lora_on and self.resume_from):
            self.producer.publish(self.learner.weights(), step=self.step)
        self.producer.version = self.step
        self.tracker = Tracker(
            active=self.acc.is_main_process, output_dir=str(self.out_dir), project=config.logging.project,
            mode=config.logging.wandb_mode, config=OmegaConf.to_container(OmegaConf.structured(config)),
            run_name=self.out_dir.name, resume_step=self.step if self.resume_from else None,
        )
        if self.acc.is_main_process:
            save_config(config, self.out_dir / "config.yaml")

    def _prepare_training(self, policy_path: str) -> None:
        """The policy, KL reference, optimizer and lr schedule, prepared by accelerate (DDP or DeepSpeed)."""
        config, lora_on = self.config, self.config.model.lora.enabled
        model, self.ref_model = self._load_models(policy_path)
        optimizer = build_optimizer(model, config.optim)
        if self.zero is not None:  # bf16: DeepSpeed's bf16 mode (bf16 weight copies, float32 masters in the optimizer)
            configure_deepspeed(self.acc, max_grad_norm=config.optim.max_grad_norm, bf16=self.precision.mixed)
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

    def _load_models(self, policy_path: str):
        """(policy, KL reference or None), before accelerate.prepare. LoRA: only the adapters train (a resumed
        run puts its saved adapters on the base model) and the reference is the policy with its adapters off."""
        cfg, dtype = self.config.model, self.precision.dtype
        model = load_policy(policy_path, cfg, compute_dtype=dtype)  # float32 masters, `dtype` autocast
        if cfg.lora.enabled and self.resume_from:
            lora.load_adapters(model, self.resume_from / lora.ADAPTER_DIR)
        if self.config.algorithm.kl_coef == 0:
            return model, None
        if cfg.lora.enabled:
            return model, lora.DisabledAdapterReference(model)
        ref_model = load_autocast_model(self.model_path, cfg, compute_dtype=dtype)  # computes as the policy does
        ref_model.eval().requires_grad_(False)
        if self.zero in (1, 2) and self.precision.mixed:  # the policy computes with DeepSpeed's bf16 copies
            ref_model.to(torch.bfloat16)
        return model, ref_model.to(self.acc.device)

    # ---------------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        """Produce a batch, learn from it, publish the new weights to the engine: one trainer step."""
        t0 = time.perf_counter()
        first, waits = self._first_round_ahead()
        produced = self.producer.next_batch(self.step, first)
        t1 = time.perf_counter()
        update = self.learner.step(produced, self.step)
        if update.sampling_stats is not None:  # the next step samples with these (HAPO adaptive temperature)
            self.producer.sampling_stats = update.sampling_stats
        check = _due(self.step + 1, self.config.rollout.sync_check_every)
        sync = self.producer.publish(self.learner.weights(), probe_policy=self.policy if check else None,
                                     batch=produced.scored.batch, step=self.step + 1)
        t2 = time.perf_counter()
        self.step += 1
        seconds = {"time/generate": produced.seconds, "time/prepare": t1 - t0 - produced.seconds
                   + update.seconds_prepare, "time/train": t2 - t1 - update.seconds_prepare, "time/step": t2 - t0}
        self._log_samples(produced, update)
        return {**self._step_metrics(produced, update), **sync, **seconds, **waits}

    def _first_round_ahead(self) -> tuple:
        """Asynchronous training: plan the steps up to `step + max_staleness` that are not planned yet (the engine
        holds version `step` now), and take this step's first round; (None, {}) in synchronous training."""
        if self.ahead is None:
            return None, {}
        last = min(self.step + self.config.rollout.max_staleness, self.config.trainer.steps - 1)
        while self.planned_through < last:
            self.planned_through += 1
            self.ahead.submit(self.producer.plan(self.planned_through))
        first, waited = self.ahead.take(self.step)
        idle = self.ahead.idle_s  # the worker's waits for a plan that ended since the last step
        waits = {"async/learner_wait_s": waited, "async/producer_wait_s": idle - self.producer_idle_mark}
        self.producer_idle_mark = idle
        return first, waits

    def _step_metrics(self, produced, update) -> dict:
        """The step's metrics over every rank: rewards, lengths, failures, selection, and the learner's own."""
        acc, scored, lengths = self.dp, produced.scored, produced.lengths
        sums = {
            "completion/len_sum": lengths.sum(), "completion/clipped": torch.tensor(
                float(sum(reason == "length" for reason in scored.batch.finish_reasons))),
            "reward/errors": torch.tensor(float(scored.errors)), "reward/invalid": (~scored.valid).sum().float(),
            "reward/grader_errors": torch.tensor(float(produced.grader_errors)),
            "tokens/before_d3s": update.tokens["before_d3s"].float(),
            "tokens/after_d3s": update.tokens["after_d3s"].float(), "tokens/trained": update.tokens["trained"].float(),
            "rows/kept": update.keep.sum().float(),
        }
        reduced = {k: acc.reduce(v.float().to(acc.device), reduction="sum").item() for k, v in sums.items()}
        max_len = acc.reduce(lengths.max().to(acc.device), reduction="max").item()
        n_all = update.all_rewards.numel()
        return {
            **group_stats(update.all_rewards, update.all_valid, self.config.rollout.group_size),
            "completion/len_mean": reduced["completion/len_sum"] / n_all,
            "completion/len_max": max_len,
            "completion/clipped_frac": reduced["completion/clipped"] / n_all,
            "reward/errors": reduced["reward/errors"],
            "reward/grader_errors": reduced["reward/grader_errors"],
            "reward/invalid": reduced["reward/invalid"],
            **{f"reward/{name}": nanmean_across(acc, torch.tensor(v)) for name, v in scored.per_func.items()},
            **produced.metrics,
            **update.metrics,
            "d3s/sample_keep_frac": reduced["rows/kept"] / n_all,
            "d3s/token_keep_frac": reduced["tokens/after_d3s"] / max(reduced["tokens/before_d3s"], 1.0),
            "train/loss_tokens": reduced["tokens/trained"],
            "throughput/gen_tokens_per_s": reduced["completion/len_sum"] / max(produced.seconds, 1e-9),
        }

    def _log_samples(self, produced, update) -> None:
        if self.step % self.config.logging.sample_table_every == 0 or self.step == 1:
            g, scored = self.config.rollout.group_size, produced.scored
            self.tracker.log_samples(self.step, [
                {"prompt": row["question"], "answer": row["answer"], "completion": self._sample_text(scored, i * g),
                 "reward": float(update.rewards[i * g])} for i, row in enumerate(scored.rows[:4])
            ])

    @staticmethod
    def _sample_text(scored, i: int) -> str:
        """A sample's text in the table: the completion, or an episode's whole transcript."""
        return scored.texts[i] if scored.episodes is None else scored.episodes[i]["transcript"]

    # ----------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        mine = self.eval_rows[self.dp.process_index :: self.dp.num_processes]
        scored = len(mine)
        if self.zero == 3 and self.config.rollout.engine == "hf" and mine:  # generation runs in lockstep: equal rows
            mine = mine + mine[:1] * (math.ceil(len(self.eval_rows) / self.acc.num_processes) - len(mine))
        t0 = time.perf_counter()
        take_grader_errors()  # the step's count was logged with the step
        if self.episodes is None:
            result = greedy_accuracy(
                self.engine, self.tokenizer, mine, template=self.config.data.template,
                max_new_tokens=self.config.trainer.eval_max_new_tokens, num_scored=scored,
            )
        else:
            result = episode_accuracy(self.episodes, self.engine, self.tokenizer, mine, num_scored=scored)
        keys = ["correct", "n", "tokens", "tool_calls", "with_tool", "turns"]
        counts = torch.tensor([result.get(k, 0.0) for k in keys] + [take_grader_errors()])
        totals = dict(zip([*keys, "grader_errors"], self.dp.reduce(counts, reduction="sum").tolist()))
        n = max(totals["n"], 1)
        record = {"step": self.step, "accuracy": totals["correct"] / n, "mean_length": totals["tokens"] / n,
                  "n": totals["n"], "seconds": time.perf_counter() - t0}
        metrics = {"eval/accuracy": record["accuracy"], "eval/mean_length": record["mean_length"],
                   "eval/grader_errors": totals["grader_errors"]}
        if self.episodes is not None:
            record["tool_call_rate"] = totals["with_tool"] / n
            metrics.update({"eval/tool_call_rate": record["tool_call_rate"], "eval/turns_mean": totals["turns"] / n,
                            "eval/tool_calls_mean": totals["tool_calls"] / n})
        self.eval_history.append(record)
        self.tracker.log_samples(self.step, result["samples"][:8])
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        acc = self.acc
        stage = ckpt.staging_dir(self.out_dir, self.step)
        if acc.is_main_process:
            stage.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        ckpt.write_rank_files(stage, acc.process_index)
        if self.ahead is not None:  # the samples generated ahead, so a resumed run trains on exactly these
            save_results(stage, acc.process_index, self.ahead.finished_results(), num_processes=acc.num_processes)
        # one layout-free optimizer state (gathered from the ZeRO shards), so any process count can resume it
        optimizer_state = portable_optimizer_state(self.optimizer, self._trainable(), self.zero)
        masters = state_dict = None
        if self.zero is not None and self.precision.mixed:  # the module holds bf16 copies: save the fp32 masters
            masters = master_weights(self._trainable(), self.zero, keep=acc.is_main_process)  # collective
            names = [name for name, p in self.policy.named_parameters() if p.requires_grad]
            state_dict = dict(zip(names, masters)) if masters is not None else None
        elif self.zero == 3:
            state_dict = acc.get_state_dict(self.model)  # gathered by DeepSpeed
        if acc.is_main_process:
            state = {
                "step": self.step, "prompts_seen": self.step * self.config.rollout.prompts_per_step,
                "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "eval_history": self.eval_history, "num_processes": acc.num_processes,
                **self.producer.state_dict(),  # HAPO sampling statistics, shaper trackers
            }
            ckpt.write_main_files(stage, model=self.policy, tokenizer=self.tokenizer, trainer_state=state,
                                  state_dict=state_dict, masters=masters)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(self.out_dir, self.step, self.config.trainer.keep_last)
        acc.wait_for_everyone()

    def _restore_masters(self, path: Path) -> None:
        """DeepSpeed bf16 mode made its float32 masters from the bf16 copies of the loaded weights: put back the
        saved masters (a checkpoint of another precision or layout has none: the masters stay as made)."""
        masters = ckpt.load_masters(path)
        if masters is not None:
            load_master_weights(self._trainable(), self.zero, masters)
        elif self.acc.is_main_process:
            print(f"warning: {path} has no {ckpt.MASTERS_FILE} (saved by another layout or precision): the float32 "
                  "master weights start from the loaded weights rounded to bf16", flush=True)

    def _restore(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        load_portable_optimizer_state(self.optimizer, self._trainable(), self.zero, state["optimizer"])
        if self.zero is not None and self.precision.mixed:
            self._restore_masters(path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
        self.producer.load_state_dict(state)
        if self.ahead is not None:
            for step, scored in sorted(load_results(path, self.acc.process_index,
                                                    num_processes=self.acc.num_processes).items()):
                self.ahead.put_result(step, scored)
                self.planned_through = step
        self.planned_through = max(self.planned_through, self.step - 1)
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
        if self.ahead is not None:
            self.ahead.close()
        self.producer.close()

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
