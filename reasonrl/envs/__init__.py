"""Environments for multi-turn, tool-using episodes (see reasonrl/envs/base.py for the protocol)."""

from __future__ import annotations

from reasonrl.envs.base import Environment, EpisodeState
from reasonrl.imports import import_callable

__all__ = ["BUILTIN_ENVS", "Environment", "EpisodeState", "build_runner", "load_environment"]


def _calculator(**args):
    from reasonrl.envs.calculator import CalculatorEnv

    return CalculatorEnv(**args)


def _retry(**args):
    from reasonrl.envs.retry import RetryEnv

    return RetryEnv(**args)


BUILTIN_ENVS = {"calculator": _calculator, "retry": _retry}


def load_environment(source: str, env_id: str | None, args: dict) -> Environment:
    """The environment a recipe's `env` section names (source builtin, python or verifiers)."""
    if source == "builtin":
        if env_id not in BUILTIN_ENVS:
            raise ValueError(f"env.id={env_id!r} is not a built-in environment; choose one of {sorted(BUILTIN_ENVS)}")
        return BUILTIN_ENVS[env_id](**args)
    if source == "python":
        return _python_env(env_id, args)
    if source == "verifiers":
        from reasonrl.envs.verifiers_env import load_verifiers_env

        return load_verifiers_env(env_id, args)
    raise ValueError(f"env.source={source!r} has no environment")


def _python_env(env_id: str | None, args: dict) -> Environment:
    if not env_id or ":" not in env_id:
        raise ValueError(f"env.id={env_id!r}: env.source=python needs 'module:Class'")
    factory = import_callable(env_id, what=f"env.id={env_id!r}")
    env = factory(**args)
    for method in ("start", "respond", "score"):
        if not callable(getattr(env, method, None)):
            raise TypeError(f"env.id={env_id!r} is not an environment: it has no {method}() (reasonrl/envs/base.py)")
    return env


def build_runner(env_cfg, *, env: Environment, tokenizer, eos_ids, template: str, max_new_tokens: int):
    """The episode runner of a recipe's `env` section, for an environment already loaded."""
    from reasonrl.envs.episodes import EpisodeLimits, EpisodeRunner
    from reasonrl.envs.tools import detect_tool_format

    tool_format = detect_tool_format(tokenizer) if env_cfg.tool_format == "auto" else env_cfg.tool_format
    limits = EpisodeLimits(
        max_turns=env_cfg.max_turns, max_turn_tokens=env_cfg.max_turn_tokens or max_new_tokens,
        max_episode_tokens=env_cfg.max_episode_tokens, max_tool_calls=env_cfg.max_tool_calls,
        tool_timeout_s=env_cfg.tool_timeout_s, max_result_chars=env_cfg.max_result_chars, tool_format=tool_format,
    )
    return EpisodeRunner(env, tokenizer, limits=limits, template=template, eos_ids=set(eos_ids),
                         workers=env_cfg.workers)
