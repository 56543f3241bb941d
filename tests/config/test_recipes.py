from pathlib import Path

import pytest

from reasonrl.config import load_config
from reasonrl.trainers.validation import validate

ROOT = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(p for p in ROOT.rglob("*.yaml") if "accelerate" not in p.parts)  # accelerate/: launch configs
ALGORITHMS = ["grpo", "dr_grpo", "dapo", "hapo", "d3s", "hapo_d3s"]


def test_there_are_recipes():
    assert any(p.name == "grpo_smollm2_arith.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads_and_validates(recipe):
    config = load_config(recipe)
    validate(config, world_size=config.model.sparse_attention.sequence_parallel)  # 1 unless one group is needed


@pytest.mark.parametrize("task", ["arith", "gsm8k"])
def test_each_algorithm_has_a_recipe_per_task_with_its_components_on(task):
    configs = {name: load_config(ROOT / task / f"{name}.yaml") for name in ALGORITHMS}
    assert configs["dr_grpo"].algorithm.advantage == "dr_grpo" and configs["dr_grpo"].algorithm.loss_agg == "constant"
    assert configs["dapo"].algorithm.dynamic_sampling.enabled and configs["dapo"].algorithm.overlong.penalty
    hapo = configs["hapo"].algorithm
    assert hapo.advantage == "hapo" and hapo.hapo.adaptive_temperature and hapo.hapo.adaptive_clip
    assert hapo.hapo.redistribution and hapo.dynamic_sampling.enabled  # HAPO builds on DAPO
    assert configs["d3s"].algorithm.d3s.sample_keep_start < 1 and configs["d3s"].algorithm.d3s.token_keep_start < 1
    both = configs["hapo_d3s"].algorithm
    assert both.advantage == "hapo" and both.d3s.token_keep_start < 1
    assert len({c.trainer.output_dir for c in configs.values()}) == len(ALGORITHMS)  # runs do not collide
