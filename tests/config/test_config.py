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


def test_recipe_base_inheritance(tmp_path):
    (tmp_path / "parent.yaml").write_text("rollout:\n  group_size: 4\n  max_new_tokens: 16\noptim:\n  lr: 2.0e-5\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "child.yaml").write_text("base: ../parent.yaml\nrollout:\n  group_size: 6\n")
    config = load_config(sub / "child.yaml", ["optim.lr=3e-5"])
    assert config.rollout.group_size == 6  # child overrides parent
    assert config.rollout.max_new_tokens == 16  # inherited
    assert config.optim.lr == 3e-5  # command line overrides both


def test_recipe_base_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml")
