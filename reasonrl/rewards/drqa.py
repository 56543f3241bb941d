"""DRQA's generation-side reward (algorithms.md section 4): correct answers earn a bonus for being shorter than the
question's reference chain.

    r = 1[correct] * (1 + lam * max(0, 1 - len / ref_length)),   r = 1[correct] without a reference

`ref_length` is the column `reasonrl drqa-data` writes: the length of the shortest correct candidate chain of the
question (single or batch mode), or null. `len` is measured in the same unit, `reasonrl.data.drqa.text_length`
(characters of the completion without surrounding whitespace), so no tokenizer is needed. Registered as
`drqa_concise`; recipe: `rewards: [{name: drqa_concise, args: {lam: 0.5}}]`.
"""

from __future__ import annotations

import math

from reasonrl.data.drqa import text_length
from reasonrl.rewards.math import answers_match, extract_answer
from reasonrl.rl.length_control import concise_correct_reward

__all__ = ["concise_correct"]


def _reference(value) -> float | None:
    """A usable reference length (finite, > 0), or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        ref = float(value)
    except (TypeError, ValueError):
        return None
    return ref if math.isfinite(ref) and ref > 0 else None


def concise_correct(
    completions: list[str], answer: list[str], ref_length: list | None = None, *, lam: float = 0.5,
    mode: str = "lenient", **kwargs,
) -> list[float]:
    """1[correct] * (1 + lam * max(0, 1 - text_length(completion) / ref_length)); 1[correct] where the row's
    ref_length is missing, null or not positive. Rewards lie in [0, 1 + lam]. The formula is
    `concise_correct_reward`; this wrapper grades the texts and reads the references."""
    refs = [None] * len(completions) if ref_length is None else list(ref_length)
    if len(refs) != len(completions):
        raise ValueError(f"ref_length has {len(refs)} values for {len(completions)} completions")
    correct = [answers_match(extract_answer(c, mode=mode), str(gold)) for c, gold in zip(completions, answer,
                                                                                            strict=True)]
    lengths = [float(text_length(c)) for c in completions]
    references = [math.nan if (ref := _reference(value)) is None else ref for value in refs]
    return concise_correct_reward(correct, lengths, references, lam=lam).tolist()
