"""AdamW and the learning-rate schedule slot: warmup then constant / cosine, WSD, or the token-based power law."""

from __future__ import annotations

import math
import re
import warnings

import torch

from reasonrl.trainers.lr_schedules import TokenPowerScheduler, solve_power_a, wsd_lr_factor


def build_optimizer(model, optim_cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer, optim_cfg, *, total_steps: int, sequences_per_step: int):
    """The LR schedule slot. Step-based schedules are a LambdaLR; `power` follows the tokens trained on
    (`train_on_batch` calls `add_tokens` before each optimizer step).

    The scheduler is NOT passed through `accelerate.prepare`: its wrapper steps a scheduler once per process per
    optimizer step, which would run warmup and decay `num_processes` times too fast.
    """
    if optim_cfg.schedule == "power":
        p = optim_cfg.power
        a = p.a if p.a is not None else solve_power_a(
            optim_cfg.lr, at_tokens=p.ref_tokens, b=p.b, batch_size=sequences_per_step
        )
        return TokenPowerScheduler(
            optimizer, a=a, b=p.b, batch_size=sequences_per_step, lr_max=optim_cfg.lr,
            warmup_tokens=p.warmup_tokens, total_tokens=p.total_tokens, decay_tokens=p.decay_tokens,
            decay=p.decay, final_factor=p.final_factor,
        )
    if optim_cfg.schedule == "wsd":
        def factor(step: int) -> float:
            return wsd_lr_factor(
                step, warmup_steps=optim_cfg.warmup_steps, total_steps=total_steps,
                decay_steps=optim_cfg.decay_steps, decay=optim_cfg.decay, final_factor=optim_cfg.final_factor,
            )
    else:
        def factor(step: int) -> float:
            return lr_factor(step, warmup_steps=optim_cfg.warmup_steps, total_steps=total_steps,
                             schedule=optim_cfg.schedule)
    factor(0)  # a bad combination (e.g. decay longer than the run) fails here, before training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def advance_schedule(scheduler) -> None:
    """One schedule step per trainer step, trained or skipped: the schedule spans trainer.steps whatever
    algorithm.num_iterations is, and a skipped step does not shift the decay. (torch warns when a schedule steps
    before the optimizer has: that is a skipped first step here, and intended.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        scheduler.step()
