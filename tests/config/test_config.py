import pytest

from reasonrl.config import ConfigError, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rollout:\n  group_size: 4\noptim:\n  lr: 2.0e-5\n")
    config = load_config(recipe, ["trainer.steps=3", "algorithm.scale_rewards=none"])
    assert config.rollout.group_size == 4
    assert config.optim.lr == 2e-5
    assert config.trainer.steps == 3
    assert config.algorithm.scale_rewards == "none"
    assert config.model.name_or_path == "smollm2-135m-instruct"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="rollout.gruop_size"):
        load_config(None, ["rollout.gruop_size=4"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="trainer.steps"):
        load_config(None, ["trainer.steps=many"])


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError, match=r"rollout.engine='sglang'.*\['hf', 'vllm', 'server'\]"):
        load_config(None, ["rollout.engine=sglang"])


def test_missing_recipe_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["trainer.steps"])


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["trainer.steps=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
