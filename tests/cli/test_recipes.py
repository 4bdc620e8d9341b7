"""Every recipe in configs/<command>/ is valid for its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunedm.cli.commands import DEFAULTS
from prunedm.cli.config import load_config
from prunedm.cli.demo import DEMO_DEFAULTS

SCHEMAS = {**DEFAULTS, "demo": DEMO_DEFAULTS}

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*/*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads(recipe):
    assert recipe.parent.name in SCHEMAS, f"configs/{recipe.parent.name}/ is not a prunedm command"
    load_config(SCHEMAS[recipe.parent.name], recipe)


def test_demo_recipe_is_the_default():
    recipe = Path(__file__).resolve().parents[2] / "configs" / "demo" / "digits-ddpm.yaml"
    assert load_config(DEMO_DEFAULTS, recipe) == DEMO_DEFAULTS
