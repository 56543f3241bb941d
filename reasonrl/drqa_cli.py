"""`reasonrl drqa-data`: build DRQA data (algorithms.md section 4) from single-question and batch-mode answers.

    reasonrl drqa-data --model smollm2-135m-instruct --task arithmetic --n-questions 200 \\
        --batch-size-questions 3 --samples 2 --max-new-tokens 256 --out data/drqa/arith.jsonl

For each question it samples `--samples` answers to the question alone (the training chat prompt: `encode_prompt`
with the task template) and `--samples` answers to batch prompts (`batch_prompt`, `--batch-size-questions`
consecutive questions per prompt, with `--batch-max-new-tokens` per prompt, by default `--max-new-tokens` per
question). Batch answers are cut per question (`split_batch_answer`) and rewritten into the single-question form
(`batch_chain`). Every chain is scored with the task's answer checker. One JSONL row per question:

    {"question": str, "answer": str,                      # gold answer, final value only (answer_mode=raw)
     "single": [{"text", "length", "tokens", "correct", "prediction", "truncated"}, ...],
     "batch":  [{"text", "length", "tokens", "correct", "prediction", "truncated"}, ...],
     "ref_length": int | null,                            # shortest correct chain of either mode (length unit)
     "pairs": [{"question", "answer", "chosen", "rejected", "chosen_length", "rejected_length",
                "chosen_source", "rejected_source", "reason"}, ...]}

`length` is `reasonrl.data.drqa.text_length` (characters), the unit of `ref_length` and of the `drqa_concise`
reward; `tokens` is the model-token count of the same text, for information. `prediction` is the extracted final
answer (null if none); `truncated` says the generation hit its token budget (for batch chains: the whole batch
answer did). The file trains directly with `data.source=jsonl data.answer_mode=raw`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from reasonrl.data.drqa import (
    batch_chain,
    batch_prompt,
    candidate,
    is_correct,
    preference_pairs,
    preferred_reference_length,
    split_batch_answer,
    summarize,
    text_length,
)

TASKS = ("arithmetic", "gsm8k")


def _data_config(args):
    """The training rows' data section: `--config`'s, else the task's as `reasonrl eval` builds it (same template)."""
    from reasonrl.cli import eval_data_config

    eval_args = argparse.Namespace(config=args.config, overrides=args.overrides, task=args.task,
                                   data_path=args.data_path, n=1)
    data = eval_data_config(eval_args)
    data.num_train = args.n_questions
    if not args.config and data.source == "arithmetic":
        data.seed = args.seed
    return data


def _chain(tokenizer, text: str, *, prediction: str | None, gold: str, truncated: bool) -> dict:
    text = text.strip()
    return {
        "text": text, "length": text_length(text), "tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        "correct": is_correct(prediction, gold), "prediction": prediction, "truncated": truncated,
    }


def build_rows(
    engine, tokenizer, rows: list[dict], *, template: str, samples: int, max_new_tokens: int,
    batch_max_new_tokens: int, questions_per_batch: int, temperature: float, seed: int,
    answer_mode: str = "lenient",
) -> list[dict]:
    """The DRQA rows of `rows` ({"question", "answer"}): sampled single and batch chains, l_ref, preference pairs."""
    from reasonrl.data.prompts import encode_prompt
    from reasonrl.rewards.math import extract_answer
    from reasonrl.rollout.base import SamplingParams

    params = SamplingParams(n=samples, temperature=temperature, seed=seed)
    out_rows = [{"question": r["question"], "answer": str(r["answer"]), "single": [], "batch": []} for r in rows]

    # (a) single-question chains, with the training prompt
    prompts = [encode_prompt(tokenizer, r["question"], template) for r in rows]
    out = engine.generate(prompts, params, [max_new_tokens] * len(prompts))
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    for i, (text, reason) in enumerate(zip(texts, out.finish_reasons, strict=True)):
        row = out_rows[i // samples]
        prediction = extract_answer(text, mode=answer_mode)
        row["single"].append(_chain(tokenizer, text, prediction=prediction, gold=row["answer"],
                                    truncated=reason == "length"))

    # (b) batch-mode chains: consecutive questions share a prompt; each answer is cut per question
    groups = [list(range(s, min(s + questions_per_batch, len(rows)))) for s in range(0, len(rows), questions_per_batch)]
    prompts = [encode_prompt(tokenizer, batch_prompt([rows[i]["question"] for i in g]), "{question}") for g in groups]
    out = engine.generate(prompts, params, [batch_max_new_tokens] * len(prompts))
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    for j, (text, reason) in enumerate(zip(texts, out.finish_reasons, strict=True)):
        group = groups[j // samples]
        for i, part in zip(group, split_batch_answer(text, len(group)), strict=True):
            row = out_rows[i]
            row["batch"].append(_chain(tokenizer, batch_chain(part["text"], part["answer"]), prediction=part["answer"],
                                       gold=row["answer"], truncated=reason == "length"))

    for row in out_rows:
        cands = [candidate(c["text"], c["length"], c["correct"], source)
                 for source in ("single", "batch") for c in row[source]]
        row["ref_length"] = preferred_reference_length(cands)
        row["pairs"] = preference_pairs(row["question"], row["answer"], cands)
    return out_rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write atomically: a temporary file next to `path`, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(summary: dict, out: str) -> None:
    s = summary
    print(f"drqa-data: {s['rows']} questions -> {out}")
    print(f"  single: mean length {_fmt(s['single_mean_length'], '.1f')} chars "
          f"({_fmt(s['single_mean_tokens'], '.1f')} tokens), accuracy {_fmt(s['single_accuracy'], '.1%')}")
    print(f"  batch:  mean segment length {_fmt(s['batch_mean_length'], '.1f')} chars "
          f"({_fmt(s['batch_mean_tokens'], '.1f')} tokens), accuracy {_fmt(s['batch_accuracy'], '.1%')}, "
          f"answer line found {_fmt(s['batch_answered'], '.1%')}")
    print(f"  rows with a correct answer: {s['rows_with_correct']}/{s['rows']} (these have ref_length); "
          f"preference pairs: {s['pairs']}")


def drqa_data(args) -> int:
    from reasonrl.cli import load_eval_model, resolve_eval_model
    from reasonrl.config import RolloutConfig
    from reasonrl.data.tasks import load_task_rows
    from reasonrl.models import load_tokenizer
    from reasonrl.rollout.factory import build_engine

    for name in ("n_questions", "batch_size_questions", "samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_max_new_tokens is not None and args.batch_max_new_tokens < 1:
        raise ValueError(f"--batch-max-new-tokens must be >= 1, got {args.batch_max_new_tokens}")
    data = _data_config(args)
    rows, _ = load_task_rows(data)
    rows = rows[: args.n_questions]
    if len(rows) < args.n_questions:
        print(f"drqa-data: only {len(rows)} questions available (asked for {args.n_questions})")

    model_path = resolve_eval_model(args.model)
    if args.engine != "hf" and (Path(model_path) / "adapter_config.json").is_file():
        raise SystemExit("a LoRA checkpoint is used with --engine hf (vLLM would need the merged model saved)")
    tokenizer = load_tokenizer(model_path)
    from reasonrl.precision import resolve_precision

    args.dtype = resolve_precision(args.dtype).dtype
    model = load_eval_model(model_path, args.dtype)
    engine = build_engine(RolloutConfig(engine=args.engine, batch_size=args.batch_size), model=model,
                          tokenizer=tokenizer, model_path=model_path, model_dtype=args.dtype, seed=args.seed)
    batch_budget = args.batch_max_new_tokens or args.max_new_tokens * args.batch_size_questions
    out_rows = build_rows(
        engine, tokenizer, rows, template=data.template, samples=args.samples, max_new_tokens=args.max_new_tokens,
        batch_max_new_tokens=batch_budget, questions_per_batch=args.batch_size_questions,
        temperature=args.temperature, seed=args.seed, answer_mode=args.answer_mode,
    )
    write_jsonl(out_rows, args.out)
    print_summary(summarize(out_rows), args.out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("drqa-data", help="DRQA data: single and batch-mode answers, reference lengths, preference "
                       "pairs, as JSONL that trains with data.source=jsonl data.answer_mode=raw")
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, local HF folder, hub id or built-in "
                   "name (e.g. smollm2-135m-instruct)")
    p.add_argument("--task", choices=TASKS, default="arithmetic")
    p.add_argument("--config", help="take the questions and template from this recipe's data section instead of "
                   "--task")
    p.add_argument("--data-path", help="gsm8k: local JSONL file (default: the hub data set openai/gsm8k)")
    p.add_argument("--n-questions", type=int, default=200, help="first N training questions")
    p.add_argument("--batch-size-questions", type=int, default=3, help="questions per batch-mode prompt")
    p.add_argument("--samples", type=int, default=2, help="answers sampled per single and per batch prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget of a single-question answer")
    p.add_argument("--batch-max-new-tokens", type=int, default=None,
                   help="token budget of a batch answer (default: --max-new-tokens x --batch-size-questions)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--answer-mode", default="lenient", choices=["lenient", "hash", "boxed", "last_number"],
                   help="answer extraction of single-question answers")
    p.add_argument("--out", required=True, help="output JSONL file (folders are created)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--batch-size", type=int, default=64, help="hf engine: sequences generated together")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and arithmetic questions' seed)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    p.set_defaults(func=drqa_data)
