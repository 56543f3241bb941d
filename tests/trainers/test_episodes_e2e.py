"""The trainer on episodes, tiny model: multi-turn rollouts with environment tokens train the model's tokens only,
the episode metrics are logged, and the `env` keys validate."""

import json
import string
from pathlib import Path

import pytest
from test_e2e import overrides

from reasonrl.config import ConfigError, load_config
from reasonrl.trainers import grpo, validation


def history(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


EPISODES = {"env.source": "builtin", "env.id": "retry", "env.args": "{max_tries: 3}", "env.max_turns": 3,
            "env.max_episode_tokens": 48, "rollout.max_new_tokens": 6, "trainer.eval_every": 2,
            "rewards": "[{name: 'rewards_for_tests:digit_count'}, {name: env}]",
            # the tiny model writes one character per token: stopping at any letter or digit ends most turns
            # before their 6-token budget, so the environment answers them
            "rollout.stop": "[" + ",".join(f"'{c}'" for c in string.ascii_letters + string.digits) + "]"}


def test_retry_episodes_train_on_the_models_tokens_only(tiny_model_dir, tmp_path):
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 2, **EPISODES)) == 0
    rows = {row["step"]: row for row in history(tmp_path)}
    for step in (1, 2):
        row = rows[step]
        # the tiny model is never right, so the environment asks again until max_tries or the turn limit
        assert 1.5 < row["episode/turns_mean"] <= 3.0
        assert 0 < row["episode/env_token_share"] < 1
        assert row["episode/model_token_share"] == pytest.approx(1 - row["episode/env_token_share"])
        assert row["reward/env"] == 0.0 and row["reward/errors"] == 0
        # completion length counts the model's tokens only: at most 3 turns of at most 6 tokens
        assert 1 <= row["completion/len_mean"] <= 18
        assert row["train/loss_tokens"] <= row["completion/len_mean"] * 8  # 2 prompts x 4 episodes
    assert rows[2]["eval/turns_mean"] >= 1 and rows[2]["eval/tool_call_rate"] == 0.0


def config(**extra):
    return load_config(None, [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("extra, message", [
    ({"env.id": "retry"}, "env.source=none"),
    ({"rewards": "[{name: env}]"}, "no environment"),
    ({"env.source": "builtin"}, "needs env.id"),
    ({"env.source": "builtin", "env.id": "chess"}, "not a built-in environment"),
    ({"env.source": "verifiers", "env.id": "x"}, "add {name: env} to rewards"),
    ({"env.source": "builtin", "env.id": "retry", "env.max_turn_tokens": 600}, "exceeds env.max_episode_tokens"),
    ({"env.source": "builtin", "env.id": "retry", "algorithm.overlong.penalty": True}, "overlong"),
    ({"env.source": "builtin", "env.id": "retry", "algorithm.reward_shapers": "[{name: rmt_budget}]"},
     "rmt_budget does not work with episodes"),
])
def test_env_settings_that_cannot_work_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        validation.validate(config(**extra), 1)


@pytest.mark.parametrize("key, value", [("env.max_turns", 0), ("env.max_turns", 101), ("env.max_episode_tokens", 0),
                                        ("env.tool_timeout_s", 0), ("env.max_result_chars", 0), ("env.workers", 0),
                                        ("env.tool_format", "json"), ("env.source", "gym"), ("data.operands", 1)])
def test_env_keys_have_ranges(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        config(**{key: value})


def test_a_calculator_recipe_validates():
    validation.validate(config(**{"env.source": "builtin", "env.id": "calculator", "data.operands": 3}), 1)
