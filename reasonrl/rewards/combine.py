"""Reward registry and robust weighted combination of reward functions."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from typing import NamedTuple

from reasonrl.imports import import_callable
from reasonrl.rewards.drqa import concise_correct
from reasonrl.rewards.math import accuracy_reward, closeness_reward, format_reward

__all__ = ["REWARD_REGISTRY", "BatchScores", "RewardFailureError", "resolve_reward", "score_batch"]

logger = logging.getLogger("reasonrl.rewards")

def env_reward(completions: list[str], env_reward: list, **kwargs) -> list:
    """An episode's own reward from its environment (its score plus per-turn rewards; reasonrl/envs). None where
    the environment did not score, so a recipe that asks for it from an environment that grades nothing fails
    loudly."""
    return list(env_reward)


REWARD_REGISTRY: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "closeness": closeness_reward,
    "drqa_concise": concise_correct,
    "env": env_reward,
    "format": format_reward,
}


def resolve_reward(name: str) -> Callable:
    """Return a reward function by registry name or ``module:function`` path."""
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name]
    if ":" not in name:
        raise ValueError(
            f"unknown reward {name!r}; valid choices: {', '.join(sorted(REWARD_REGISTRY))} "
            "or a 'module:function' import path"
        )
    return import_callable(name, what=f"reward {name!r}")


def _bad_value(v) -> bool:
    if v is None:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True


class RewardFailureError(RuntimeError):
    """The reward functions failed for every sample of several consecutive steps: the run cannot learn."""


class BatchScores(NamedTuple):
    total: list[float]  # weighted sum per completion (0.0 where invalid)
    valid: list[bool]  # every reward function returned a finite number for it
    per_func: dict[str, list[float]]  # each function's raw scores, NaN where it failed
    errors: int  # failed function calls (a raise, a wrong length) plus functions that returned some NaN/None
    failures: dict[str, str]  # function name -> what went wrong this call (with the traceback of a raise)


def score_batch(
    funcs: list[tuple[str, Callable, float]],
    completions: list[str],
    columns: dict[str, list],
    *,
    strict: bool = False,
    logged: set[str] | None = None,
) -> BatchScores:
    """Score ``completions`` with weighted reward functions.

    Failing samples are marked invalid (total 0.0); the first error of each function is logged once (per call, or
    per ``logged`` set when the caller passes a persistent one); every failure of this call is in ``failures``.
    """
    n = len(completions)
    valid = [True] * n
    per_func: dict[str, list[float]] = {}
    failures: dict[str, str] = {}
    errors = 0
    if logged is None:
        logged = set()

    def _fail(fname: str, msg: str, *, exc: bool) -> None:
        if strict:
            raise RuntimeError(f"reward function {fname!r} failed: {msg}")
        failures[fname] = f"{msg}\n{traceback.format_exc()}" if exc else msg
        if fname not in logged:
            logged.add(fname)
            (logger.exception if exc else logger.warning)("reward function %r failed: %s", fname, msg)

    for fname, func, _weight in funcs:
        try:
            out = func(completions=completions, **columns)
        except Exception as e:
            if strict:
                raise RuntimeError(f"reward function {fname!r} raised {type(e).__name__}: {e}") from e
            errors += 1
            _fail(fname, f"raised {type(e).__name__}: {e}", exc=True)
            per_func[fname] = [float("nan")] * n
            valid = [False] * n
            continue
        out = list(out) if out is not None else None
        if out is None or len(out) != n:
            errors += 1
            got = "None" if out is None else len(out)
            _fail(fname, f"returned {got} values for {n} completions", exc=False)
            per_func[fname] = [float("nan")] * n
            valid = [False] * n
            continue
        bad = [i for i, v in enumerate(out) if _bad_value(v)]
        if bad:
            errors += 1
            _fail(fname, f"returned NaN/None for samples {bad}", exc=False)
        for i in bad:
            valid[i] = False
        per_func[fname] = [float("nan") if _bad_value(v) else float(v) for v in out]

    total = [
        sum(w * per_func[fname][i] for fname, _f, w in funcs) if valid[i] else 0.0 for i in range(n)
    ]
    return BatchScores(total, valid, per_func, errors, failures)
