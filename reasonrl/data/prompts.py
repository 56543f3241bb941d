"""Prompt sources: synthetic arithmetic, JSONL/Parquet loaders, chat prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["DataError", "arithmetic_rows", "build_prompt", "encode_prompt", "load_jsonl_rows"]


class DataError(ValueError):
    """A dataset file is missing or malformed."""


def arithmetic_rows(
    n: int, *, seed: int, digits: int = 2, operators: str = "+-*", operands: int = 2, min_operands: int = 0
) -> list[dict]:
    """``n`` deterministic arithmetic questions like ``{"question": "47 * 83", "answer": "3901"}``: ``operands``
    numbers each, or with ``min_operands`` >= 2, a count drawn uniformly from [min_operands, operands] per problem
    (0 draws nothing, so the rows of a fixed count are the same with and without the option)."""
    if digits < 1 or operands < 2 or not operators or any(op not in "+-*" for op in operators):
        raise ValueError("need digits >= 1, operands >= 2, operators drawn from '+-*'")
    if min_operands and not 2 <= min_operands <= operands:
        raise ValueError(f"min_operands={min_operands} must be 0 or in [2, operands={operands}]")
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rows = []
    for _ in range(n):
        count = rng.randint(min_operands, operands) if min_operands else operands
        parts = [str(rng.randint(lo, hi))]
        for _ in range(count - 1):
            parts += [rng.choice(operators), str(rng.randint(lo, hi))]
        question = " ".join(parts)
        answer = eval(question, {"__builtins__": {}}, {})  # only digits and +-* here
        rows.append({"question": question, "answer": str(answer)})
    return rows


def _hash_answer(text: str) -> str:
    return text.rsplit("####", 1)[-1].strip().replace(",", "")


def check_row(row, where: str, question_key: str, answer_key: str, answer_mode: str,
              extra_columns: tuple[str, ...] | list[str] = ()) -> dict:
    """{"question", "answer"} plus the `extra_columns` (passed on to reward functions, e.g. DRQA's ref_length)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is not a JSON object")
    for key in (question_key, answer_key, *extra_columns):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r} (keys: {sorted(row)})")
    q, a = row[question_key], row[answer_key]
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: {question_key!r} must be a non-empty string, got {type(q).__name__}")
    if a is None:
        raise DataError(f"{where}: {answer_key!r} is null")
    a = str(a)
    if answer_mode == "hash":
        if "####" not in a:
            raise DataError(f"{where}: {answer_key!r} has no '####' final answer")
        a = _hash_answer(a)
    return {**{key: row[key] for key in extra_columns}, "question": q, "answer": a}


def load_jsonl_rows(
    path, *, question_key: str = "question", answer_key: str = "answer", answer_mode: str = "hash",
    extra_columns: tuple[str, ...] | list[str] = (),
) -> list[dict]:
    """Load ``{"question", "answer"}`` rows from a JSONL (or .parquet) file.

    ``answer_mode="hash"`` keeps only the text after the last '####' (GSM8K);
    ``"raw"`` keeps the answer field as is. Errors name file and line/row.
    """
    if answer_mode not in ("hash", "raw"):
        raise ValueError(f"answer_mode must be 'hash' or 'raw', got {answer_mode!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[dict] = []
    if path.suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        for idx, row in enumerate(ds):
            rows.append(check_row(row, f"{path}:row {idx}", question_key, answer_key, answer_mode, extra_columns))
    else:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from e
                rows.append(check_row(row, where, question_key, answer_key, answer_mode, extra_columns))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def build_prompt(question: str, template: str) -> list[dict]:
    """Chat messages for one question: a single user turn from ``template``."""
    return [{"role": "user", "content": template.format(question=question)}]


def encode_prompt(tokenizer, question: str, template: str) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's header."""
    text = tokenizer.apply_chat_template(build_prompt(question, template), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
