"""docs/recipe.md is generated from the models that validate recipes: it must be current, and every field
a user can set must say what it does."""
from pathlib import Path

from pydantic import BaseModel

from birdbone_core import recipe_docs
from birdbone_core.recipe import Recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"


def test_committed_reference_is_current():
    assert DOC.read_text() == recipe_docs.render(), \
        "docs/recipe.md is stale: python -m birdbone_core.recipe_docs > docs/recipe.md"


def test_every_recipe_field_is_described():
    missing, seen = [], set()

    def walk(path: str, model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{path}{name}")
            for sub in recipe_docs.model_types(field.annotation):
                walk(f"{path}{name}.", sub)
    walk("", Recipe)
    assert not missing, missing
