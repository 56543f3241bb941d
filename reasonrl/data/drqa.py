"""DRQA (Dynamic Reasoning Quota Allocation, algorithms.md section 4): data from batch-mode reasoning.

Answering several questions in one prompt ("batch mode") makes models compress their reasoning. The data step
(`reasonrl drqa-data`) samples answers to each question alone ("single") and inside numbered batch prompts
("batch"), cuts the batch answers into one reasoning segment per question, and scores everything. The pure pieces:

- `batch_prompt`: N numbered questions in one prompt. The format the model is asked for::

      <reasoning for question 1>
      Answer 1: <number>
      <reasoning for question 2>
      Answer 2: <number>
      ...

- `split_batch_answer`: per question, the reasoning segment and the parsed final answer; when the model wrote no
  "Answer k:" line at all, its numbered list items ("1. 12 + 35 = 47") instead (`split_numbered_items`: small models
  such as SmolLM2-135M answer batch prompts that way).
- `preference_pairs`: chosen/rejected pairs under correct & shorter > correct & longer > incorrect.
- `preferred_reference_length`: the length of the shortest correct candidate, the RL recipe's l_ref.

A batch segment becomes a candidate in the single-question form, `batch_chain`: the segment, then its parsed
answer as "#### <answer>" (the final-answer line the task templates ask for), so both modes' chains read alike,
end with a checkable answer and are measured alike.

Length unit: `text_length`, the number of characters of the text with surrounding whitespace stripped. It needs
no tokenizer, so the reward (`reasonrl.rewards.drqa`) measures completions exactly as the data step measured the
candidates (the data rows also carry model-token counts, for information only).
"""

from __future__ import annotations

import re

from reasonrl.rewards.math import answers_match, normalize_answer

__all__ = [
    "SOURCES",
    "batch_chain",
    "batch_prompt",
    "candidate",
    "is_correct",
    "preference_pairs",
    "preferred_reference_length",
    "split_batch_answer",
    "split_numbered_items",
    "summarize",
    "text_length",
]

SOURCES = ("batch", "single")

# "Answer 2: 17"; also "Final answer 2: 17", markdown emphasis ("**Answer 2:** 17"), a space before the colon.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*_#-]*(?:final[ \t]+)?answer[ \t]+(\d+)[ \t]*[*_]*[ \t]*:[*_]*[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE
)
# Fallback for models that number their answers as a list instead ("1. 12 + 35 = 47", "Question 2: ...", "3) ...").
_ITEM_LINE_RE = re.compile(r"^[ \t>*_#-]*(?:question[ \t]+)?(\d+)[ \t]*(?:[.)][ \t]|:)", re.IGNORECASE | re.MULTILINE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def text_length(text: str) -> int:
    """The DRQA length unit: characters of ``text`` without surrounding whitespace."""
    return len(text.strip())


def batch_prompt(questions: list[str]) -> str:
    """One prompt with the questions numbered from 1, asking for each final answer on its own "Answer k:" line."""
    if isinstance(questions, str) or not questions:
        raise ValueError("batch_prompt needs a non-empty list of questions")
    for k, question in enumerate(questions, start=1):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question {k} must be a non-empty string, got {question!r}")
    numbered = "\n".join(f"Question {k}: {q.strip()}" for k, q in enumerate(questions, start=1))
    which = "question" if len(questions) == 1 else f"{len(questions)} questions in order"
    return (
        f"Answer the following {which}. For each question, reason step by step, then write its final answer on "
        f"its own line as \"Answer k: <number>\", where k is the question's number.\n\n{numbered}"
    )


def _parse_answer_value(rest: str) -> str | None:
    """The number on an answer line: a \\boxed{} value, else the first number after the last '=', else the first
    number of the line ("72 clips (48 + 24)" -> 72, "48 + 24 = 72" -> 72); None when there is none."""
    rest = rest.replace("$", "").replace("*", "")
    boxed = _BOXED_RE.search(rest)
    if boxed:
        rest = boxed.group(1)
    elif "=" in rest:
        rest = rest.rsplit("=", 1)[1]
    match = _NUMBER_RE.search(rest)
    if match is None:
        return None
    return normalize_answer(match.group(0)) or None


def split_batch_answer(text: str, n: int) -> list[dict]:
    """Cut a batch-mode answer to ``n`` questions into ``[{"index": k, "text": segment, "answer": value}]``, k = 1..n.

    Answer lines are taken in text order; each one closes the segment that began after the previous answer line
    (of any number). Question k gets the segment before its first "Answer k:" line and that line's number.
    Missing line: text "" and answer None; line without a number: its segment and answer None. Numbers outside
    1..n and repeated lines only act as segment boundaries.

    When the text has no "Answer k:" line for any k in 1..n, numbered list items are read instead (small models
    often answer "1. 12 + 35 = 47" / "Question 2: ..."): `split_numbered_items`. Never raises on model text.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    text = text if isinstance(text, str) else ""
    parts = {k: {"index": k, "text": "", "answer": None} for k in range(1, n + 1)}
    seen: set[int] = set()
    start = 0
    for match in _ANSWER_LINE_RE.finditer(text):
        k = int(match.group(1))
        if 1 <= k <= n and k not in seen:
            seen.add(k)
            parts[k]["text"] = text[start : match.start()].strip()
            parts[k]["answer"] = _parse_answer_value(match.group(2))
        start = match.end()
    if not seen:
        return split_numbered_items(text, n)
    return [parts[k] for k in range(1, n + 1)]


def split_numbered_items(text: str, n: int) -> list[dict]:
    """The fallback of `split_batch_answer`: item k is the text from the first line numbered k ("k." / "k)" /
    "k:" / "Question k:") up to the next numbered line of any number, without the marker; its answer is the number
    after the item's last '=' (else its last number; a \\boxed{} value wins). Missing item: text "", answer None."""
    text = text if isinstance(text, str) else ""
    parts = {k: {"index": k, "text": "", "answer": None} for k in range(1, n + 1)}
    markers = list(_ITEM_LINE_RE.finditer(text))
    seen: set[int] = set()
    for i, match in enumerate(markers):
        k = int(match.group(1))
        if not 1 <= k <= n or k in seen:
            continue
        seen.add(k)
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        segment = text[match.end() : end].strip()
        parts[k]["text"] = segment
        parts[k]["answer"] = _item_value(segment)
    return [parts[k] for k in range(1, n + 1)]


def _item_value(segment: str) -> str | None:
    """A list item's answer: the \\boxed{} value, else the first number after the last '=', else the last number."""
    cleaned = segment.replace("$", "").replace("*", "")
    if _BOXED_RE.search(cleaned) or "=" in cleaned:
        return _parse_answer_value(cleaned)
    numbers = _NUMBER_RE.findall(cleaned)
    return (normalize_answer(numbers[-1]) or None) if numbers else None


def batch_chain(segment: str, answer: str | None) -> str:
    """A batch-mode segment in the single-question form: the reasoning, then "#### <answer>" when one was parsed."""
    segment = segment.strip()
    if answer is None:
        return segment
    return f"{segment}\n#### {answer}" if segment else f"#### {answer}"


def candidate(text: str, length: int, correct: bool, source: str) -> dict:
    """A checked candidate chain: ``{"text", "length", "correct", "source"}``."""
    if not isinstance(text, str):
        raise TypeError(f"candidate text must be a string, got {type(text).__name__}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"candidate length must be a non-negative int, got {length!r}")
    if not isinstance(correct, bool):
        raise TypeError(f"candidate correct must be a bool, got {correct!r}")
    if source not in SOURCES:
        raise ValueError(f"candidate source must be one of {SOURCES}, got {source!r}")
    return {"text": text, "length": length, "correct": correct, "source": source}


def _checked(candidates) -> list[dict]:
    if not isinstance(candidates, (list, tuple)):
        raise TypeError(f"candidates must be a list of dicts, got {type(candidates).__name__}")
    out = []
    for i, c in enumerate(candidates):
        if not isinstance(c, dict):
            raise TypeError(f"candidate {i} must be a dict, got {type(c).__name__}")
        missing = {"text", "length", "correct", "source"} - set(c)
        if missing:
            raise ValueError(f"candidate {i} lacks {sorted(missing)}")
        try:
            out.append(candidate(c["text"], c["length"], c["correct"], c["source"]))
        except (TypeError, ValueError) as err:
            raise type(err)(f"candidate {i}: {err}") from err
    return out


def _better(a: dict, b: dict) -> str | None:
    """Why ``a`` is preferred to ``b`` ("correctness" or "length"), or None when it is not."""
    if a["correct"] and not b["correct"]:
        return "correctness"
    if a["correct"] and b["correct"] and a["length"] < b["length"]:
        return "length"
    return None  # a incorrect, or both correct with a not shorter


def preference_pairs(question: str, answer: str, candidates: list[dict]) -> list[dict]:
    """Every ordered pair (chosen, rejected) under correct & shorter > correct & longer > incorrect.

    Two correct candidates of equal length, two incorrect ones, and a candidate with empty text (nothing to
    judge, e.g. a batch answer with neither reasoning nor answer line) give no pair. Each pair:
    ``{question, answer, chosen, rejected, chosen_length, rejected_length, chosen_source, rejected_source, reason}``
    with reason "correctness" (chosen correct, rejected not) or "length" (both correct, chosen shorter).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    if answer is None:
        raise ValueError("answer must not be None")
    cands = [c for c in _checked(candidates) if c["text"].strip()]
    pairs = []
    for a in cands:
        for b in cands:
            reason = _better(a, b)
            if reason is not None:
                pairs.append({
                    "question": question, "answer": str(answer),
                    "chosen": a["text"], "rejected": b["text"],
                    "chosen_length": a["length"], "rejected_length": b["length"],
                    "chosen_source": a["source"], "rejected_source": b["source"],
                    "reason": reason,
                })
    return pairs


def preferred_reference_length(candidates: list[dict]) -> int | None:
    """The length of the shortest correct candidate of positive length (any source); None when there is none.
    An empty chain (e.g. a batch answer line with no reasoning before it) is no usable reference."""
    lengths = [c["length"] for c in _checked(candidates) if c["correct"] and c["length"] > 0]
    return min(lengths) if lengths else None


def is_correct(prediction: str | None, gold: str) -> bool:
    """The task's answer checker on an already extracted prediction."""
    return answers_match(prediction, str(gold))


def summarize(rows: list[dict]) -> dict:
    """Totals of `reasonrl drqa-data` rows: mean lengths and accuracy of each mode, the share of batch chains whose
    "Answer k:" line was found with a number, rows with a correct answer, rows with a reference length, pairs."""

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    single = [c for row in rows for c in row["single"]]
    batch = [c for row in rows for c in row["batch"]]
    return {
        "rows": len(rows),
        "single_mean_length": mean([c["length"] for c in single]),
        "single_mean_tokens": mean([c["tokens"] for c in single if "tokens" in c]),
        "single_accuracy": mean([c["correct"] for c in single]),
        "batch_mean_length": mean([c["length"] for c in batch]),
        "batch_mean_tokens": mean([c["tokens"] for c in batch if "tokens" in c]),
        "batch_accuracy": mean([c["correct"] for c in batch]),
        "batch_answered": mean([c.get("prediction") is not None for c in batch]),
        "rows_with_correct": sum(any(c["correct"] for c in row["single"] + row["batch"]) for row in rows),
        "rows_with_ref_length": sum(row["ref_length"] is not None for row in rows),
        "pairs": sum(len(row["pairs"]) for row in rows),
    }
