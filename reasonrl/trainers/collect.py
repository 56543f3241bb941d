"""A step's scored rollouts, and DAPO dynamic sampling: keep the groups whose rewards differ, refill with new prompts.

With several processes each rank collects its own share of groups; the ranks agree (by collective min) on when
to stop and on how many groups each keeps, so every rank trains on the same number of groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reasonrl.batch import RolloutBatch, concat_batches
from reasonrl.rl.shaping import groups_with_signal


@dataclass
class Scored:
    """P prompts x G completions of one rank, with their rewards."""

    rows: list[dict]  # the P prompt rows (question, answer, ...)
    batch: RolloutBatch  # P * G completions, prompt-major
    texts: list[str]
    rewards: torch.Tensor  # [P * G] weighted total
    valid: torch.Tensor  # [P * G] bool: every reward function returned a finite number
    per_func: dict[str, list[float]]  # each reward function's raw scores (NaN where it failed)
    errors: int
    failures: dict[str, str] = field(default_factory=dict)  # reward function -> its last failure (traceback)
    grader_errors: int = 0  # math_verify failures while scoring (reasonrl.rewards.math.take_grader_errors)
    episodes: list[dict] | None = None  # per sample, for episodes: turns, tool calls, tokens, transcript

    @property
    def group_size(self) -> int:
        return self.batch.group_size

    def select_groups(self, groups: list[int]) -> Scored:
        g = self.group_size
        rows = [i * g + j for i in groups for j in range(g)]
        idx = torch.tensor(rows, dtype=torch.long)
        return Scored(
            rows=[self.rows[i] for i in groups], batch=self.batch.select_rows(idx), texts=[self.texts[i] for i in rows],
            rewards=self.rewards[idx], valid=self.valid[idx],
            per_func={k: [v[i] for i in rows] for k, v in self.per_func.items()}, errors=self.errors,
            failures=self.failures, grader_errors=self.grader_errors,
            episodes=None if self.episodes is None else [self.episodes[i] for i in rows],
        )


def concat_scored(parts: list[Scored]) -> Scored:
    return Scored(
        rows=[r for p in parts for r in p.rows], batch=concat_batches([p.batch for p in parts]),
        texts=[t for p in parts for t in p.texts], rewards=torch.cat([p.rewards for p in parts]),
        valid=torch.cat([p.valid for p in parts]),
        per_func={k: [v for p in parts for v in p.per_func[k]] for k in parts[0].per_func},
        errors=sum(p.errors for p in parts), failures={k: v for p in parts for k, v in p.failures.items()},
        grader_errors=sum(p.grader_errors for p in parts),
        episodes=None if parts[0].episodes is None else [r for p in parts for r in p.episodes],
    )


def signal_metric(scored: Scored, metric: str) -> torch.Tensor:
    """The per-sample values whose spread decides whether a group carries signal."""
    if metric == "reward":
        return scored.rewards
    return torch.tensor(scored.per_func[metric], dtype=torch.float32)


def dynamic_sampling(acc, generate_round: Callable[[int], Scored], *, groups_per_rank: int, cfg) -> tuple:
    """Generate rounds (round 0 = the step's own prompts, then refills) until every rank holds
    `groups_per_rank` groups with a reward spread, or `cfg.max_gen_batches` rounds ran.

    Returns (Scored, metrics). On a shortfall every rank keeps the same number of groups, the smallest any rank
    found (`on_shortfall=train`), or a RuntimeError names the numbers (`fail`). When no rank found a single group,
    the last round is returned unfiltered: its advantages are all zero and the step is skipped.
    """
    kept: list[Scored] = []
    generated = errors = grader_errors = 0
    rounds = 0
    last = None
    while True:
        last = generate_round(rounds)
        rounds += 1
        generated += len(last.rows)
        errors += last.errors
        grader_errors += last.grader_errors
        values = signal_metric(last, cfg.metric)
        signal = groups_with_signal(values, last.valid, group_size=last.group_size)
        groups = signal.nonzero().squeeze(-1).tolist()
        if groups:
            kept.append(last.select_groups(groups))
        have = sum(len(k.rows) for k in kept)
        fewest = int(acc.reduce(torch.tensor(have, device=acc.device), reduction="min"))
        if fewest >= groups_per_rank:
            break
        if cfg.max_gen_batches and rounds >= cfg.max_gen_batches:
            if cfg.on_shortfall == "fail":
                raise RuntimeError(
                    f"dynamic sampling found {fewest} of {groups_per_rank} groups with a reward spread per process "
                    f"after {rounds} generation rounds (algorithm.dynamic_sampling.max_gen_batches); raise the cap, "
                    "or set algorithm.dynamic_sampling.on_shortfall=train"
                )
            break
    take = min(fewest, groups_per_rank)
    metrics = {
        "dynamic/gen_rounds": float(rounds),
        "dynamic/prompts_generated": float(acc.reduce(torch.tensor(generated, device=acc.device), "sum")),
        "dynamic/groups_kept": float(take * acc.num_processes),
        "dynamic/shortfall": float(take < groups_per_rank),
    }
    result = last if take == 0 else concat_scored(kept).select_groups(list(range(take)))
    result.errors = errors
    result.grader_errors = grader_errors
    return result, metrics
