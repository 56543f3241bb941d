"""The numeric keys of the recipe schema, found by walking its dataclasses (shared by the schema tests)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from reasonrl.config import Range, RecipeConfig


@dataclass(frozen=True)
class NumericKey:
    path: str  # dotted, e.g. algorithm.hapo.clip_alpha; a list item's fields read rewards[0].weight
    kind: type  # int or float
    optional: bool  # the type allows None
    range: Range | None
    doc: str
    default: object


def _numeric(annotation) -> tuple[type | None, bool]:
    """(int or float, optional) for int / float / `X | None` annotations, (None, _) for anything else (bool too)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    core = [a for a in args if a is not type(None)]
    kind = core[0] if len(core) == 1 and core[0] in (int, float) else None
    return kind, type(None) in args


def numeric_keys(cls=RecipeConfig, prefix: str = "") -> list[NumericKey]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if dataclasses.is_dataclass(annotation):
            out += numeric_keys(annotation, f"{prefix}{f.name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            out += numeric_keys(item, f"{prefix}{f.name}[0].")
        else:
            kind, optional = _numeric(annotation)
            if kind is not None:
                out.append(NumericKey(f"{prefix}{f.name}", kind, optional, f.metadata.get("range"),
                                      f.metadata.get("doc", ""), f.default))
    return out
