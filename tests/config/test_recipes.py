from pathlib import Path

import pytest

from reasonrl.config import load_config
from reasonrl.trainers.grpo import validate

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "grpo_smollm2_arith.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe):
    config = load_config(recipe)
    validate(config, world_size=1)
