"""Math answer extraction, comparison and TRL-style reward functions."""

from __future__ import annotations

import logging
import math
import re
import threading

__all__ = ["accuracy_reward", "answers_match", "extract_answer", "format_reward", "normalize_answer",
           "take_grader_errors"]

logger = logging.getLogger("reasonrl.rewards")
# math_verify failures since the last `take_grader_errors()`, per thread: reward functions return plain lists (TRL's
# API), so the count travels beside them; each scoring call takes its own thread's count (asynchronous training
# scores in a worker thread and in the main thread at once) and the trainer logs it as reward/grader_errors
_grader_counts = threading.local()
_grader_error_logged = False

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FORMAT_RE = re.compile(r"####\s*\$?\s*-?[\d,]*\.?\d+\s*\.?\s*$")
_MODES = ("hash", "boxed", "last_number", "lenient")


def normalize_answer(text: str) -> str:
    """Strip whitespace, commas, '$', trailing '.'; turn '12.0' into '12'."""
    s = text.strip().replace(",", "").replace("$", "").strip()
    s = s.rstrip(".").strip()
    try:
        value = float(s)
    except ValueError:
        return s
    if math.isfinite(value) and re.fullmatch(r"-?\d+\.0*", s):
        return s.split(".")[0]
    return s


def _extract_hash(text: str) -> str | None:
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    if not tail:
        return None
    return tail.splitlines()[0].strip() or None


def _extract_boxed(text: str) -> str | None:
    idx = text.rfind("\\boxed{")
    if idx < 0:
        return None
    start = idx + len("\\boxed{")
    depth = 1
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None  # unbalanced


def _extract_last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1]


def extract_answer(text: str, *, mode: str = "lenient") -> str | None:
    """Extract the final answer from ``text``; ``None`` when nothing is found."""
    if mode not in _MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; valid: {', '.join(_MODES)}")
    if text is None:
        return None
    if mode == "hash":
        raw = _extract_hash(text)
    elif mode == "boxed":
        raw = _extract_boxed(text)
    elif mode == "last_number":
        raw = _extract_last_number(text)
    else:
        raw = _extract_hash(text)
        if raw is None:
            raw = _extract_boxed(text)
        if raw is None:
            raw = _extract_last_number(text)
    if raw is None:
        return None
    out = normalize_answer(raw)
    return out or None


def _to_float(s: str) -> float | None:
    try:
        v = float(normalize_answer(s))
    except (ValueError, TypeError):
        return None
    return v if math.isfinite(v) else None


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric comparison (1e-6 relative), else math_verify, else string equality."""
    if pred is None or gold is None:
        return False
    p, g = _to_float(pred), _to_float(gold)
    if p is not None and g is not None:
        return math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-12)
    try:
        from math_verify import parse, verify

        def _wrap(s: str) -> str:
            s = s.strip()
            return s if "$" in s or "\\boxed" in s else f"${s}$"

        gp, pp = parse(_wrap(gold)), parse(_wrap(pred))
        if gp and pp and verify(gp, pp):
            return True
    except Exception as err:  # noqa: BLE001 - a grader error falls back to string equality, counted and logged once
        _count_grader_error(pred, gold, err)
    return normalize_answer(pred) == normalize_answer(gold)


def _count_grader_error(pred: str, gold: str, err: Exception) -> None:
    global _grader_error_logged
    if not _grader_error_logged:
        _grader_error_logged = True
        logger.warning("math_verify failed on %r vs %r (string comparison used)", pred, gold, exc_info=err)
    _grader_counts.n = getattr(_grader_counts, "n", 0) + 1


def take_grader_errors() -> int:
    """This thread's math_verify failures since its last call (and resets the count)."""
    count = getattr(_grader_counts, "n", 0)
    _grader_counts.n = 0
    return count


def accuracy_reward(completions: list[str], answer: list[str], *, mode: str = "lenient", **kwargs) -> list[float]:
    """1.0 where the extracted answer matches the gold ``answer`` column, else 0.0."""
    return [
        1.0 if answers_match(extract_answer(c, mode=mode), str(a)) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 where the completion ends with '#### <number>' (trailing space/period ok)."""
    return [1.0 if isinstance(c, str) and _FORMAT_RE.search(c) else 0.0 for c in completions]


def closeness_reward(completions: list[str], answer: list[str], *, mode: str = "lenient", **kwargs) -> list[float]:
    """Partial credit for numeric answers: 1 - min(1, |pred - gold| / max(|gold|, 1)); 0 without a number.

    Dense signal for tasks where exact answers are rare at first (small models on arithmetic): a group whose
    samples are all wrong still ranks nearer answers above farther ones. Combine it with `accuracy`.
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        pred = extract_answer(completion, mode=mode)
        p, g = (_to_float(pred) if pred is not None else None), _to_float(str(gold))
        if p is None or g is None or not math.isfinite(p):
            scores.append(0.0)
            continue
        scores.append(1.0 - min(1.0, abs(p - g) / max(abs(g), 1.0)))
    return scores
