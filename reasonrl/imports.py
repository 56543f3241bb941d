"""`module:name` specs of recipes (reward functions, environments): the object they name, or a clear error."""

from __future__ import annotations

import importlib


def import_callable(spec: str, *, what: str):
    """The callable `name` of `module` for the spec 'module:name'; a ValueError naming `what` (e.g. "reward
    'x:y'") and the problem otherwise."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{what}: expected 'module:name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    found = getattr(module, name, None)
    if found is None or not callable(found):
        raise ValueError(f"{what}: module {module_name!r} has no callable {name!r}")
    return found
