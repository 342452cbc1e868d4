"""The recipe reference, generated from the pydantic models that validate recipes (their docstrings, field
types, defaults, bounds and descriptions), so the documentation and the validation cannot drift:

    python -m birdbone_core.recipe_docs > docs/recipe.md     # tests/test_recipe_docs.py checks it is current
"""
from __future__ import annotations

import inspect
import json
import sys
import typing
from types import UnionType

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from birdbone_core.recipe import Recipe

HEADER = """# Recipe reference

A recipe is a YAML file (`birdbone compress -r recipe.yaml`, `birdbone init RUN -r recipe.yaml`). Every
section and field is optional; unknown keys are refused. `birdbone init --targets JSON` overrides fields
by dotted path, e.g. `{"prune.sparsity": 0.4}`. Generated from the models in `birdbone_core/` by
`python -m birdbone_core.recipe_docs`; do not edit by hand.
"""


def model_types(annotation) -> list[type[BaseModel]]:
    """The recipe models inside a field's type (X, X | None, list[X], dict[str, X])."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += model_types(arg)
    return out


def _type_name(annotation) -> str:
    if inspect.isclass(annotation) and not typing.get_args(annotation):
        return "null" if annotation is type(None) else annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(_type_name(a) for a in args)}]"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{json.dumps(value)}`"


def _bounds(field) -> str:
    signs = {Ge: (">=", "ge"), Gt: (">", "gt"), Le: ("<=", "le"), Lt: ("<", "lt")}
    parts = []
    for m in field.metadata:
        for cls, (sign, attr) in signs.items():
            if isinstance(m, cls):
                parts.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(parts)


def _section(path: str, model: type[BaseModel], seen: set) -> list[str]:
    lines = [f"## `{path}`" if path else "## Top level", ""]
    doc = inspect.getdoc(model)
    if doc and model.__doc__ is not None:
        lines += [doc, ""]
    lines += ["| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {_bounds(field)} | {desc} |")
        for sub in model_types(field.annotation):
            nested.append((f"{path}.{name}" if path else name, sub))
    out = lines + [""]
    for sub_path, sub in nested:
        if (sub_path, sub) not in seen:
            seen.add((sub_path, sub))
            out += _section(sub_path, sub, seen)
    return out


def render() -> str:
    return HEADER + "\n" + "\n".join(_section("", Recipe, set())).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
