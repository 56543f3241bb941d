"""GRPO trainer: generate -> score -> group advantages -> clipped token-mean policy loss, one process or many.

Run it as `accelerate launch -m reasonrl.trainers.grpo --config recipes/X.yaml key=value ...`
or `reasonrl train recipes/X.yaml key=value ...`.
"""

from __future__ import annotations

import argparse
import functools
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

from reasonrl.batch import RolloutBatch
from reasonrl.config import ConfigError, RecipeConfig, load_config, save_config
from reasonrl.data.prompts import encode_prompt
from reasonrl.data.tasks import load_task_rows
from reasonrl.models import load_model, load_tokenizer, resolve_model_path
from reasonrl.rewards.combine import resolve_reward, score_batch
from reasonrl.rl.advantages import grpo_advantages
from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.factory import build_engine
from reasonrl.trainers import checkpoint as ckpt
from reasonrl.trainers.data_order import prompts_for_step
from reasonrl.trainers.evaluate import greedy_accuracy
from reasonrl.trainers.optimization import build_optimizer, build_scheduler
from reasonrl.trainers.step import group_stats, train_on_batch
from reasonrl.trainers.tracking import Tracker


def validate(config: RecipeConfig, world_size: int) -> None:
    """Checks that need the process count or relate several keys; all before any model is loaded."""
    r = config.rollout
    if r.group_size < 2:
        raise ConfigError(f"rollout.group_size={r.group_size}: GRPO needs at least 2 samples per prompt")
    if r.prompts_per_step < 1 or r.prompts_per_step % world_size:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} must be a positive multiple of the "
            f"number of processes ({world_size})"
        )
    if r.max_new_tokens < 1 or config.trainer.eval_max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens and trainer.eval_max_new_tokens must be >= 1")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature={r.temperature}: sampling for training needs a temperature > 0")
    if config.optim.micro_batch_size < 1 or config.algorithm.num_iterations < 1 or config.trainer.steps < 1:
        raise ConfigError("optim.micro_batch_size, algorithm.num_iterations and trainer.steps must be >= 1")
    if not config.rewards:
        raise ConfigError("rewards: at least one reward function is needed")
    for spec in config.rewards:
        try:
            resolve_reward(spec.name)
        except ValueError as err:
            raise ConfigError(f"rewards: {err}") from err


class GRPOTrainer:
    def __init__(self, config: RecipeConfig, accelerator: Accelerator | None = None):
        self.config = config
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        validate(config, self.acc.num_processes)
        self.out_dir = Path(config.trainer.output_dir)
        set_seed(config.trainer.seed)

        self.train_rows, self.eval_rows = load_task_rows(config.data)
        self.reward_funcs = [
            (spec.name, functools.partial(resolve_reward(spec.name), **spec.args), spec.weight)
            for spec in config.rewards
        ]
        self.logged_reward_errors: set[str] = set()

        with self.acc.main_process_first():  # the built-in model is converted once, by the main process
            self.model_path = resolve_model_path(config.model.name_or_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.resume_from = ckpt.latest_checkpoint(self.out_dir) if config.trainer.resume == "auto" else None
        policy_path = str(self.resume_from / "model") if self.resume_from else self.model_path
        model = load_model(policy_path, dtype=config.model.dtype, attn_implementation=config.model.attn_implementation)
        self.ref_model = None
        if config.algorithm.kl_coef > 0:
            self.ref_model = load_model(self.model_path, dtype=config.model.dtype).eval().requires_grad_(False)
            self.ref_model.to(self.acc.device)
        optimizer = build_optimizer(model, config.optim)
        scheduler = build_scheduler(optimizer, config.optim, total_steps=config.trainer.steps)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        self.policy = self.acc.unwrap_model(self.model)
        self.engine = build_engine(
            config.rollout, model=self.policy, tokenizer=self.tokenizer, model_path=policy_path,
            model_dtype=config.model.dtype, seed=config.trainer.seed,
        )
        self.step = 0
        self.eval_history: list[dict] = []
        if self.resume_from:
            self._restore(self.resume_from)
        self.tracker = Tracker(
            active=self.acc.is_main_process, output_dir=str(self.out_dir), project=config.logging.project,
            mode=config.logging.wandb_mode, config=OmegaConf.to_container(OmegaConf.structured(config)),
            run_name=self.out_dir.name,
        )
        if self.acc.is_main_process:
            save_config(config, self.out_dir / "config.yaml")

    # ----------------------------------------------------------------------------------------------- rollout
    def _local_prompt_rows(self, step: int) -> list[dict]:
        r = self.config.rollout
        indices = prompts_for_step(len(self.train_rows), step=step, per_step=r.prompts_per_step,
                                   seed=self.config.trainer.seed)
        per_rank = r.prompts_per_step // self.acc.num_processes
        mine = indices[self.acc.process_index * per_rank : (self.acc.process_index + 1) * per_rank]
        return [self.train_rows[i] for i in mine]

    def _generate(self, rows: list[dict], step: int) -> tuple[RolloutBatch, list[str]]:
        r = self.config.rollout
        prompts = [encode_prompt(self.tokenizer, row["question"], self.config.data.template) for row in rows]
        seed = self.config.trainer.seed + 7919 * (step * self.acc.num_processes + self.acc.process_index)
        params = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed)
        out = self.engine.generate(prompts, params, [r.max_new_tokens] * len(prompts))
        width = max(1, max(len(ids) for ids in out.completion_ids))
        n = len(out.completion_ids)
        ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        logps = torch.zeros((n, width))
        for i, (tok, lp) in enumerate(zip(out.completion_ids, out.logprobs)):
            ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
            mask[i, : len(tok)] = True
            logps[i, : len(lp)] = torch.tensor(lp)
        batch = RolloutBatch(
            prompt_ids=[p for p in prompts for _ in range(r.group_size)], completion_ids=ids, completion_mask=mask,
            rollout_logprobs=logps, finish_reasons=out.finish_reasons, group_size=r.group_size,
        )
        texts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        return batch, texts

    def _score(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
        g = self.config.rollout.group_size
        columns = {key: [row[key] for row in rows for _ in range(g)] for key in rows[0]}
        total, valid, per_func, errors = score_batch(
            self.reward_funcs, texts, columns, strict=self.config.trainer.strict_rewards,
            logged=self.logged_reward_errors,
        )
        return torch.tensor(total), torch.tensor(valid), per_func, errors

    # ---------------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, acc = self.config, self.acc
        t0 = time.perf_counter()
        rows = self._local_prompt_rows(self.step)
        batch, texts = self._generate(rows, self.step)
        t1 = time.perf_counter()
        rewards, valid, per_func, errors = self._score(rows, texts)
        # Advantages need every rank's rewards when scale_rewards=batch; all ranks compute the same global vector.
        all_rewards, all_valid = acc.gather(rewards), acc.gather(valid)
        all_adv = grpo_advantages(
            all_rewards, group_size=cfg.rollout.group_size, eps=cfg.algorithm.std_eps,
            unbiased_std=cfg.algorithm.unbiased_std, scale=cfg.algorithm.scale_rewards, valid=all_valid,
        )
        n_local = rewards.numel()
        advantages = all_adv[acc.process_index * n_local : (acc.process_index + 1) * n_local]
        t2 = time.perf_counter()
        batch.completion_mask &= valid[:, None]  # a sample whose reward failed is not trained on
        train_metrics = train_on_batch(
            self.model, self.optimizer, self.scheduler, acc, batch, advantages,
            algo=cfg.algorithm, optim=cfg.optim, pad_id=self.tokenizer.pad_token_id,
            temperature=cfg.rollout.temperature, ref_model=self.ref_model,
        )
        self.engine.load_weights(self.policy.named_parameters())
        t3 = time.perf_counter()
        self.step += 1

        lengths = batch.completion_mask.sum(-1).float()
        sums = {
            "completion/len_sum": lengths.sum(), "completion/clipped": torch.tensor(
                float(sum(reason == "length" for reason in batch.finish_reasons))),
            "reward/errors": torch.tensor(float(errors)), "reward/invalid": (~valid).sum().float(),
        }
        reduced = {k: acc.reduce(v.float(), reduction="sum").item() for k, v in sums.items()}
        max_len = acc.reduce(lengths.max(), reduction="max").item()
        n_all = all_rewards.numel()
        metrics = {
            **group_stats(all_rewards, all_valid, cfg.rollout.group_size),
            "completion/len_mean": reduced["completion/len_sum"] / n_all,
            "completion/len_max": max_len,
            "completion/clipped_frac": reduced["completion/clipped"] / n_all,
            "reward/errors": reduced["reward/errors"],
            "reward/invalid": reduced["reward/invalid"],
            **{f"reward/{name}": _nanmean_across(acc, torch.tensor(v)) for name, v in per_func.items()},
            **train_metrics,
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2, "time/step": t3 - t0,
            "throughput/gen_tokens_per_s": reduced["completion/len_sum"] / max(t1 - t0, 1e-9),
        }
        if self.step % max(1, cfg.logging.sample_table_every) == 0 or self.step == 1:
            self.tracker.log_samples(self.step, [
                {"prompt": row["question"], "answer": row["answer"], "completion": texts[i * cfg.rollout.group_size],
                 "reward": float(rewards[i * cfg.rollout.group_size])} for i, row in enumerate(rows[:4])
            ])
        return metrics

    # ----------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        mine = self.eval_rows[self.acc.process_index :: self.acc.num_processes]
        t0 = time.perf_counter()
        result = greedy_accuracy(
            self.engine, self.tokenizer, mine, template=self.config.data.template,
            max_new_tokens=self.config.trainer.eval_max_new_tokens,
        )
        counts = torch.tensor([result["correct"], result["n"], result["tokens"]])
        correct, n, tokens = self.acc.reduce(counts, reduction="sum").tolist()
        record = {"step": self.step, "accuracy": correct / max(n, 1), "mean_length": tokens / max(n, 1), "n": n,
                  "seconds": time.perf_counter() - t0}
        self.eval_history.append(record)
        self.tracker.log_samples(self.step, result["samples"][:8])
        return {"eval/accuracy": record["accuracy"], "eval/mean_length": record["mean_length"]}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        acc = self.acc
        stage = ckpt.staging_dir(self.out_dir, self.step)
        if acc.is_main_process:
            stage.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        ckpt.write_rank_files(stage, acc.process_index)
        if acc.is_main_process:
            state = {
                "step": self.step, "prompts_seen": self.step * self.config.rollout.prompts_per_step,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "eval_history": self.eval_history, "num_processes": acc.num_processes,
            }
            ckpt.write_main_files(stage, model=self.policy, tokenizer=self.tokenizer, trainer_state=state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(self.out_dir, self.step, self.config.trainer.keep_last)
        acc.wait_for_everyone()

    def _restore(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
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
        while self.step < cfg.steps:
            metrics = self.train_step()
            last = self.step == cfg.steps
            if self.eval_rows and (last or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)):
                metrics.update(self.evaluate())
            self.tracker.log(self.step, metrics, console=tqdm.write)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if last or (cfg.save_every > 0 and self.step % cfg.save_every == 0):
                self.save()
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

    def ranks_hold_identical_parameters(self) -> bool:
        """Exact comparison of per-tensor float64 sums and absolute sums across processes."""
        params = [p.detach().double() for p in self.policy.parameters()]
        fingerprint = torch.stack([p.sum() for p in params] + [p.abs().sum() for p in params]).to(self.acc.device)
        every_rank = self.acc.gather(fingerprint[None])  # [world, 2 * num_tensors]
        return bool((every_rank == every_rank[0]).all())


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
    recipe, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    random.seed(config.trainer.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file weight loading bars drown the training progress bar
    GRPOTrainer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
