"""Every recipe is a valid config (resolved and validated; the data and teacher files are not needed for this)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_plugin.run.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.py"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_resolves(recipe):
    cfg = load_config(str(recipe))
    assert cfg.kd.head in ("proxyless", "adadistill", "trainable") and cfg.num_classes > 0
    assert cfg.output.startswith("work_dirs/")
