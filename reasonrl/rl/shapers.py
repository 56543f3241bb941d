"""Reward shapers: a list applied in order to the step's rewards (`algorithm.reward_shapers`).

Each shaper sees the batch (`ShapingContext`) and returns the new reward vector, the new correctness term and
metrics. The reward is R = R_correct * (product of the gates) + (sum of the additive terms): a shaper that gates
(e1 effort, the RMT budget's `multiplicative` mode) multiplies the correctness term R_correct only, as the papers
define it, so that the penalties and bonuses added before it (DAPO overlong, RMT additive length reward) survive;
a shaper that adds leaves R_correct as it is. Some also act before generation: the RMT budget shaper sets each prompt's `max_new_tokens`, the effort shaper draws each prompt's effort
(shown in the prompt). Per-prompt running statistics live in `PromptLengthTracker`s, checkpointed with the run.

- `overlong`: DAPO soft overlong punishment, added (algorithms.md 0).
- `rmt_budget`: RMT dynamic token budget (algorithms.md 3.1): B_t(x) = max(B_min, B_0(x) * gamma^((t/T)^k)) with
  B_0(x) the running (EMA) length of x's correct completions (before any: `initial`); the triangular length reward
  r_len(l; B_t) is added to correct answers (weight) or multiplies R_correct; generation stops at margin * B_t.
- `effort`: e1 adaptive effort control (algorithms.md 5): R_correct is paid only when the completion length
  l <= r * T(x), r the prompt's effort, T(x) its mean completion length: this group's (`mean: group`), the prompt's
  running EMA (`ema`), or the running EMA of the prompt's full-effort groups only (`full_effort`, falling back to
  that of all prompts), so that lower efforts are fractions of the unconstrained length rather than of a mean that
  the low-effort groups themselves pull down.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from reasonrl.data.effort import EFFORT_LEVELS, check_effort
from reasonrl.rl.length_control import (
    PromptLengthTracker,
    budget_length_reward,
    combine_length_reward,
    correct_length_budget,
    effort_reward,
    group_mean_length,
    rmt_budget,
)
from reasonrl.rl.shaping import overlong_penalty

SHAPERS = ("overlong", "rmt_budget", "effort")
EFFORT_MEANS = ("group", "ema", "full_effort")
FULL_EFFORT_KEY = "\x00full-effort"  # the tracker's entry for the mean over every prompt's full-effort groups


@dataclass
class ShapingContext:
    rewards: torch.Tensor  # [N] current rewards
    correct: torch.Tensor  # [N] 1.0 where the answer is correct
    lengths: torch.Tensor  # [N] completion tokens
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens
    prompt_keys: list[str]  # [N] the prompt (question) of each row
    group_size: int
    step: int
    total_steps: int
    max_new_tokens: int
    efforts: torch.Tensor | None = None  # [N] effort of each row (effort shaper)
    max_tokens: torch.Tensor | None = None  # [N] each row's own max_new_tokens (RMT budget)
    # every rank's (keys, values) for tracker updates: identity in one process, an all-gather otherwise
    gather: callable = field(default=lambda keys, values: (keys, values))
    # [N] the correctness term R_correct of `rewards` (the weighted accuracy reward); None: `correct`
    correct_reward: torch.Tensor | None = None

    def __post_init__(self):
        if self.correct_reward is None:
            self.correct_reward = self.correct.to(self.rewards.dtype)


def _regated(ctx: ShapingContext, gated_correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, R_correct) after a gate turned R_correct into `gated_correct`: the other terms are kept."""
    gated = gated_correct.to(ctx.rewards.dtype)
    return ctx.rewards - ctx.correct_reward + gated, gated


class OverlongShaper:
    def __init__(self, buffer: int = 8, factor: float = 1.0):
        self.buffer, self.factor = buffer, factor

    def __call__(self, ctx: ShapingContext):
        max_len = ctx.max_tokens if ctx.max_tokens is not None else None
        if max_len is None:
            penalty = overlong_penalty(ctx.lengths, max_len=ctx.max_new_tokens, buffer=min(self.buffer,
                                       ctx.max_new_tokens), factor=self.factor)
        else:  # per-row limits (a budget shaper ran before generation)
            penalty = torch.stack([overlong_penalty(ctx.lengths[i : i + 1], max_len=int(m), buffer=min(self.buffer,
                                   int(m)), factor=self.factor)[0] for i, m in enumerate(max_len.tolist())])
        shaped = ctx.rewards + penalty.to(ctx.rewards.dtype)
        return shaped, ctx.correct_reward, {"reward/overlong_penalty": float(penalty.mean())}


class BudgetShaper:
    def __init__(self, initial: float | None = None, gamma: float = 0.5, minimum: float = 8.0, k: float = 1.0,
                 variant: str = "ratio_pow", shape: str = "rise_fall", mode: str = "additive", weight: float = 0.5,
                 margin: float = 1.25, decay: float = 0.9, quantile: float = 1.0):
        self.initial, self.gamma, self.minimum, self.k, self.variant = initial, gamma, minimum, k, variant
        self.shape, self.mode, self.weight, self.margin, self.quantile = shape, mode, weight, margin, quantile
        if mode not in ("additive", "multiplicative"):
            raise ValueError(f"rmt_budget mode must be additive or multiplicative, got {mode!r}")
        if margin < 1:
            raise ValueError(f"rmt_budget margin must be >= 1, got {margin}")
        self.tracker = PromptLengthTracker(decay=decay)

    def budgets(self, keys: list[str], step: int, total_steps: int, max_new_tokens: int) -> torch.Tensor:
        start = float(self.initial if self.initial is not None else max_new_tokens)
        initial = torch.tensor([self.tracker.get(key, start) for key in keys], dtype=torch.float64)
        return rmt_budget(step, total_steps, initial=initial, gamma=self.gamma, minimum=self.minimum, k=self.k,
                          variant=self.variant)

    def max_new_tokens(self, keys: list[str], step: int, total_steps: int, max_new_tokens: int) -> list[int]:
        """Generation limits: margin * B_t(x), at most the recipe's max_new_tokens."""
        budgets = self.budgets(keys, step, total_steps, max_new_tokens)
        return [max(1, min(max_new_tokens, math.ceil(self.margin * float(b)))) for b in budgets]

    def __call__(self, ctx: ShapingContext):
        budget = self.budgets(ctx.prompt_keys, ctx.step, ctx.total_steps, ctx.max_new_tokens)
        r_len = budget_length_reward(ctx.lengths.double(), budget, shape=self.shape)
        c = ctx.correct_reward.double()
        total = combine_length_reward(c, r_len, mode=self.mode, weight=self.weight)
        if self.mode == "additive":  # c + bonus: the bonus is an added term, R_correct stays
            shaped, correct_reward = ctx.rewards + (total - c).to(ctx.rewards.dtype), ctx.correct_reward
        else:  # c * r_len: a gate on R_correct
            shaped, correct_reward = _regated(ctx, total)
        correct = (ctx.correct > 0).to(ctx.rewards.dtype)
        # the next budgets start from the lengths of correct answers (groups without one keep their statistics)
        g = ctx.group_size
        per_group = correct_length_budget(ctx.lengths.double(), correct, g, quantile=self.quantile, fallback=1.0)
        has_correct = (correct.view(-1, g) > 0).any(dim=1).tolist()
        keys = [ctx.prompt_keys[i * g] for i, ok in enumerate(has_correct) if ok]
        values = [float(v) for v, ok in zip(per_group, has_correct) if ok]
        self.tracker.update(*ctx.gather(keys, values))
        return shaped, correct_reward, {"rmt/budget_mean": float(budget.mean()),
                                        "rmt/length_reward_mean": float(r_len.mean())}

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)


class EffortShaper:
    def __init__(self, levels: list[float] | tuple[float, ...] = EFFORT_LEVELS, band: float = 0.0,
                 mean: str = "group", decay: float = 0.9, seed: int = 0):
        self.levels = [check_effort(level) for level in levels]
        if mean not in EFFORT_MEANS:
            raise ValueError(f"effort mean must be one of {EFFORT_MEANS}, got {mean!r}")
        self.band, self.mean, self.seed = band, mean, seed
        self.tracker = PromptLengthTracker(decay=decay)

    def draw(self, keys: list[str], step: int, round_: int = 0) -> list[float]:
        """One effort per prompt, uniform over `levels`, reproducible from (seed, step, round, prompt)."""
        return [random.Random(f"{self.seed}/{step}/{round_}/{key}").choice(self.levels) for key in keys]

    def __call__(self, ctx: ShapingContext):
        if ctx.efforts is None:
            raise ValueError("the effort shaper needs each row's effort (ShapingContext.efforts)")
        g = ctx.group_size
        cap = float(ctx.max_new_tokens)
        group_mean = group_mean_length(ctx.lengths.double(), g, truncated=ctx.truncated, cap=cap)
        keys = [ctx.prompt_keys[i * g] for i in range(len(group_mean))]
        means = [float(m) for m in group_mean]
        if self.mean == "group":
            reference = group_mean
        else:  # running means from before this step's samples
            reference = torch.tensor(self._running_reference(keys, means), dtype=torch.float64)
        self._update(keys, means, ctx.efforts.view(-1, g)[:, 0].tolist(), ctx.gather)
        per_row = reference.repeat_interleave(g)

        def gate_of(c):
            return effort_reward(c, ctx.lengths.double(), ctx.efforts.double(), per_row, band=self.band,
                                 truncated=ctx.truncated)

        gate = gate_of(torch.ones_like(per_row))
        shaped, correct_reward = _regated(ctx, gate_of(ctx.correct_reward.double()))  # R_correct * 1[l <= r T]
        metrics = {"effort/within_frac": float(gate.mean()), "effort/mean_length": float(per_row.mean()),
                   "effort/mean": float(ctx.efforts.mean())}
        return shaped, correct_reward, metrics

    def _running_reference(self, keys: list[str], group_means: list[float]) -> list[float]:
        """ema: the prompt's EMA, first visit: this group's mean. full_effort: the prompt's EMA over its full-effort
        groups, else the EMA over every prompt's full-effort groups, else this group's mean."""
        if self.mean == "ema":
            return [self.tracker.get(key, m) for key, m in zip(keys, group_means)]
        overall = self.tracker.get(FULL_EFFORT_KEY)
        return [self.tracker.get(key, m if overall is None else overall) for key, m in zip(keys, group_means)]

    def _update(self, keys: list[str], group_means: list[float], group_efforts: list[float], gather) -> None:
        if self.mean == "full_effort":  # only unconstrained (top-effort) lengths define the target
            top = max(self.levels)
            full = [(key, m) for key, m, r in zip(keys, group_means, group_efforts) if r == top]
            keys = [key for key, _ in full] + [FULL_EFFORT_KEY] * len(full)
            group_means = [m for _, m in full] * 2
        self.tracker.update(*gather(keys, group_means))

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)


def build_shaper(name: str, args: dict):
    factories = {"overlong": OverlongShaper, "rmt_budget": BudgetShaper, "effort": EffortShaper}
    if name not in factories:
        raise ValueError(f"unknown reward shaper {name!r}; choose from {SHAPERS}")
    try:
        return factories[name](**args)
    except TypeError as err:
        raise ValueError(f"reward shaper {name!r}: {err}") from err


def apply_shapers(shapers: list, ctx: ShapingContext) -> tuple[torch.Tensor, dict]:
    """Run the shapers in order, each on the previous one's rewards and correctness term."""
    metrics: dict = {}
    for shaper in shapers:
        ctx.rewards, ctx.correct_reward, more = shaper(ctx)
        metrics.update(more)
    return ctx.rewards, metrics
