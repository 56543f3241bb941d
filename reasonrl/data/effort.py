"""Effort control (e1, algorithms.md section 5): the effort value r in (0, 1] is shown to the model in the prompt.

r is a fraction of the model's current mean chain-of-thought length for the question: in training the reward pays
for a correct answer only within r x that mean; at inference (`reasonrl generate --effort`, `reasonrl eval --effort`)
the same line in the prompt asks for that share of the usual effort. Training and inference use this one format.
"""

from __future__ import annotations

EFFORT_LEVELS = (0.125, 0.25, 0.5, 0.75, 1.0)  # the training distribution's support (uniform over these)


def check_effort(effort: float) -> float:
    effort = float(effort)
    if not 0.0 < effort <= 1.0:
        raise ValueError(f"effort must be in (0, 1], got {effort}")
    return effort


def effort_line(effort: float) -> str:
    return f"Effort: {check_effort(effort):.3g}"


def with_effort(question: str, effort: float | None) -> str:
    """The question with its effort line appended (unchanged for effort=None)."""
    return question if effort is None else f"{question}\n{effort_line(effort)}"
