"""`reasonrl` command line: train a recipe, evaluate a model or checkpoint, generate completions, serve a model for
rollouts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from reasonrl.config import ConfigError, DataConfig, RolloutConfig, load_config
from reasonrl.episode_cli import add_env_arguments, episode_config, eval_episodes, generate_episodes

TASKS = ("arithmetic", "gsm8k")
ENGINES = ("hf", "vllm", "server")


def _train(args) -> int:
    from reasonrl.trainers import grpo

    argv = (["--config", args.recipe] if args.recipe else []) + args.overrides
    return grpo.main(argv)


def resolve_eval_model(target: str) -> str:
    """A run folder -> its latest checkpoint's model; a checkpoint folder -> its model; else a model name/path."""
    from reasonrl.models import resolve_model_path
    from reasonrl.trainers.checkpoint import latest_checkpoint

    path = Path(target)
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{target} has no complete checkpoint")
        path = latest
    for folder in ("model", "adapter"):  # adapter/: a LoRA run's checkpoint
        if (path / folder / "config.json").is_file() or (path / folder / "adapter_config.json").is_file():
            return str(path / folder)
    return resolve_model_path(target)


def load_eval_model(model_path: str, dtype: str):
    """The model of `resolve_eval_model`: a LoRA adapter folder is put on its base model and merged."""
    from reasonrl.models import load_model

    adapter_config = Path(model_path) / "adapter_config.json"
    if not adapter_config.is_file():
        return load_model(model_path, dtype=dtype).eval()
    from peft import PeftModel

    base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(load_model(base, dtype=dtype), model_path).merge_and_unload().eval()


def eval_data_config(args) -> DataConfig:
    if args.config:
        data = load_config(args.config, args.overrides).data
    elif args.task == "arithmetic":
        data = DataConfig()
    else:  # gsm8k: a local JSONL file if given, else the hub data set as `datasets` names it
        if args.data_path:
            data = DataConfig(source="jsonl", path=args.data_path, eval_path=args.data_path, num_train=1)
        else:
            data = DataConfig(source="hub", path="openai/gsm8k", hub_config="main", num_train=1)
        data.template = "{question}\nPut the final answer after '####'."
    data.num_eval = args.n
    return data


def cli_rollout_config(args, base: RolloutConfig | None = None) -> RolloutConfig:
    """The typed engine settings of a command: ``base`` (default: RolloutConfig's defaults, i.e. vLLM's own memory
    settings) with the command line's --engine, --batch-size and, if given, --server-url."""
    changes = {"engine": args.engine, "batch_size": args.batch_size}
    if getattr(args, "server_url", None):
        changes["server_url"] = args.server_url
    return dataclasses.replace(base or RolloutConfig(), **changes)


def eval_rollout_config(args) -> RolloutConfig:
    """`reasonrl eval`'s engine settings: those of the --config recipe (its vLLM memory settings, say), if given."""
    return cli_rollout_config(args, load_config(args.config, args.overrides).rollout if args.config else None)


def build_cli_engine(rollout: RolloutConfig, model_path: str, tokenizer, *, dtype: str, seed: int = 0, **engine_kw):
    """The engine of a command, through the trainer's factory: hf generates with the loaded model (a LoRA adapter
    merged); vllm and server load nothing here (a LoRA checkpoint would need its merged model saved first)."""
    from reasonrl.precision import resolve_precision
    from reasonrl.rollout.factory import build_engine

    if rollout.engine != "hf" and (Path(model_path) / "adapter_config.json").is_file():
        raise ValueError(f"{model_path}: a LoRA checkpoint runs with --engine hf (vLLM would need the merged model "
                         "saved)")
    dtype = resolve_precision(dtype).dtype  # "auto": bf16 where the hardware runs it fast
    model = load_eval_model(model_path, dtype) if rollout.engine == "hf" else None
    return build_engine(rollout, model=model, tokenizer=tokenizer, model_path=model_path, model_dtype=dtype,
                        seed=seed, **engine_kw)


def close_engine(engine) -> None:
    """Release an engine's resources (vLLM's engine, a server's weight group); hf has nothing to release."""
    if hasattr(engine, "close"):
        engine.close()


def _eval(args) -> int:
    from reasonrl.data.tasks import load_task_rows
    from reasonrl.models import load_tokenizer
    from reasonrl.trainers.evaluate import greedy_accuracy

    config = episode_config(args, args.config, args.overrides)
    if config.env.source != "none":
        return eval_episodes(args, config)
    data = eval_data_config(args)
    rollout = eval_rollout_config(args)
    _, rows = load_task_rows(data)
    model_path = resolve_eval_model(args.model)
    tokenizer = load_tokenizer(model_path)
    engine = build_cli_engine(rollout, model_path, tokenizer, dtype=args.dtype)
    start = time.perf_counter()
    try:
        result = greedy_accuracy(engine, tokenizer, rows, template=data.template, max_new_tokens=args.max_new_tokens,
                                 answer_mode=args.answer_mode, effort=args.effort)
    finally:
        close_engine(engine)
    summary = {
        "model": model_path, "task": args.config or args.task, "engine": rollout.engine, "n": int(result["n"]),
        "accuracy": result["correct"] / max(result["n"], 1), "mean_length": result["tokens"] / max(result["n"], 1),
        "max_new_tokens": args.max_new_tokens, "seconds": round(time.perf_counter() - start, 1),
    }
    if args.effort is not None:
        summary["effort"] = args.effort
    if args.json:
        print(json.dumps(summary))
    else:
        effort = "" if args.effort is None else f" at effort {args.effort:g}"
        print(f"accuracy {summary['accuracy']:.1%} on {summary['n']} problems{effort}, mean length "
              f"{summary['mean_length']:.1f} tokens ({summary['seconds']} s)")
    return 0


def effort_arg(text: str) -> float:
    """argparse type of --effort: a number in (0, 1]."""
    from reasonrl.data.effort import check_effort

    try:
        return check_effort(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def read_prompts_file(path: str) -> list[dict]:
    """The rows of a JSONL file: one JSON object with a non-empty "question" string per non-empty line (its other
    fields, such as "answer", are there for an environment)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
            question = row.get("question") if isinstance(row, dict) else None
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f'{path}:{line_no}: needs a JSON object with a non-empty "question" string')
            rows.append(row)
    return rows


def _generation_engine(args, model_path: str, tokenizer, reflex):
    """The engine of `reasonrl generate`. CyclicReflex: HFEngine takes its processor per call (see
    `_generate_completions`); VLLMEngine at start-up (vLLM registers logits processors then); the server has none."""
    rollout = cli_rollout_config(args)
    if reflex is not None and rollout.engine == "server":
        raise ValueError("--cyclic-reflex runs with --engine hf or vllm (the server registers no CyclicReflex "
                         "processor)")
    vllm_reflex = reflex if rollout.engine == "vllm" else None
    return build_cli_engine(rollout, model_path, tokenizer, dtype=args.dtype, seed=args.seed or 0,
                            cyclic_reflex=vllm_reflex)


def _generate_completions(engine, prompts: list[list[int]], params, max_new_tokens: int, hf_reflex):
    """All completions, prompt-major. With CyclicReflex on HFEngine, one call per prompt: the transformers processor
    counts generated tokens from the prompt width, and HFEngine left-pads a call's rows to its longest prompt."""
    if hf_reflex is None:
        return engine.generate(prompts, params, [max_new_tokens] * len(prompts))
    from dataclasses import replace

    from reasonrl.rollout.base import RolloutOutput

    out = RolloutOutput([], [], [])
    for i, ids in enumerate(prompts):
        part = engine.generate([ids], replace(params, seed=params.request_seed(i)), [max_new_tokens],
                               logits_processors=[hf_reflex.hf_processor(prompt_width=len(ids))])
        out.completion_ids += part.completion_ids
        out.logprobs += part.logprobs
        out.finish_reasons += part.finish_reasons
    return out


def generate_rows(args) -> list[dict]:
    """The questions of `reasonrl generate` as data rows (--prompt, then --prompts-file), its options checked."""
    rows = [{"question": q} for q in args.prompt or []] + (read_prompts_file(args.prompts_file) if args.prompts_file
                                                           else [])
    if not rows:
        raise ValueError("nothing to generate: give --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    if "{question}" not in args.template:
        raise ValueError(f"--template must contain {{question}}, got {args.template!r}")
    if args.max_new_tokens < 1 or args.n < 1 or args.temperature < 0:
        raise ValueError("need --max-new-tokens >= 1, --n >= 1 and --temperature >= 0")
    if args.n > 1 and args.temperature == 0:
        raise ValueError("greedy decoding (--temperature 0) gives one completion per question: "
                         "set --temperature for --n")
    return rows


def _generate(args) -> int:
    from reasonrl.data.effort import with_effort
    from reasonrl.data.prompts import encode_prompt
    from reasonrl.models import load_tokenizer
    from reasonrl.rollout.base import SamplingParams
    from reasonrl.rollout.cyclic_reflex import REFLECTION_WORDS
    from reasonrl.rollout.cyclic_reflex_vllm import CyclicReflexSettings

    rows = generate_rows(args)
    config = episode_config(args)
    if config.env.source != "none":
        return generate_episodes(args, config, rows)
    questions = [row["question"] for row in rows]
    model_path = resolve_eval_model(args.model)
    tokenizer = load_tokenizer(model_path)
    reflex = None
    if args.cyclic_reflex:
        reflex = CyclicReflexSettings.from_tokenizer(
            tokenizer, amplitude=args.reflex_amplitude, period=args.reflex_period, shift=args.reflex_shift,
            words=args.reflex_word or REFLECTION_WORDS, think_end=args.think_end,
        )
    prompts = [encode_prompt(tokenizer, with_effort(q, args.effort), args.template) for q in questions]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    engine = _generation_engine(args, model_path, tokenizer, reflex)
    start = time.perf_counter()
    try:
        out = _generate_completions(engine, prompts, params, args.max_new_tokens,
                                    reflex if args.engine == "hf" else None)
    finally:
        close_engine(engine)
    seconds = time.perf_counter() - start
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    for k, (ids, text, reason) in enumerate(zip(out.completion_ids, texts, out.finish_reasons)):
        i, j = divmod(k, args.n)
        if args.json:
            print(json.dumps({
                "prompt_index": i, "completion_index": j, "question": questions[i], "effort": args.effort,
                "prompt": tokenizer.decode(prompts[i]), "completion": text, "tokens": len(ids),
                "finish_reason": reason,
            }), flush=True)
            continue
        if j == 0:
            print(f"=== prompt {i + 1}/{len(questions)}: {questions[i]!r}")
        print(f"--- completion {j + 1}/{args.n} ({len(ids)} tokens, {reason})\n{text}", flush=True)
    if not args.json:
        total = sum(len(ids) for ids in out.completion_ids)
        print(f"{len(texts)} completions, {total} tokens in {seconds:.1f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonrl", description="RL training for reasoning LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe: reasonrl train recipes/X.yaml key=value ...")
    train.add_argument("recipe", nargs="?", help="recipe YAML (defaults apply without one)")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="greedy accuracy of a model, checkpoint or run folder (with --env: of "
                        "episodes)")
    ev.add_argument("model", help="run folder, checkpoint folder, local HF folder, hub id or built-in name")
    ev.add_argument("--task", choices=TASKS, default="arithmetic")
    ev.add_argument("--config", help="take the eval split from this recipe's data section instead of --task (and "
                    "its env section, if any, runs episodes)")
    ev.add_argument("--data-path", help="gsm8k: local JSONL file (default: the hub data set openai/gsm8k)")
    ev.add_argument("--n", type=int, default=200, help="number of held-out problems")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--answer-mode", default="lenient", choices=["lenient", "hash", "boxed", "last_number"])
    add_engine_arguments(ev)
    ev.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 where the hardware has fast bf16 (model.dtype: auto), else float32")
    ev.add_argument("--json", action="store_true", help="print one JSON line")
    ev.add_argument("--effort", type=effort_arg, help="e1 effort r in (0, 1]: the prompts get the effort line")
    add_env_arguments(ev)
    ev.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    ev.set_defaults(func=_eval)
    add_generate_parser(sub)
    from reasonrl.serve import add_parser as add_serve_parser

    add_serve_parser(sub)
    from reasonrl.drqa_cli import add_parser as add_drqa_parser

    add_drqa_parser(sub)
    return parser


def add_engine_arguments(parser) -> None:
    parser.add_argument("--engine", default="hf", choices=ENGINES,
                        help="hf: transformers generate; vllm: vLLM in this process; server: a `reasonrl serve` "
                        "process serving this model (its API key, if any, from REASONRL_API_KEY)")
    parser.add_argument("--batch-size", type=int, default=64, help="hf engine: sequences generated together")
    parser.add_argument("--server-url", help=f"--engine server: its URL (default {RolloutConfig.server_url})")


def add_generate_parser(sub) -> None:
    from reasonrl.rollout.cyclic_reflex import REFLECTION_WORDS

    gen = sub.add_parser("generate", help="completions of a model, checkpoint or run folder for given questions")
    gen.add_argument("model", help="run folder, checkpoint folder, local HF folder, hub id or built-in name")
    gen.add_argument("--prompt", action="append", metavar="TEXT", help="a question (repeatable)")
    gen.add_argument("--prompts-file", metavar="FILE", help='JSONL file: one {"question": ...} object per line')
    gen.add_argument("--template", default=DataConfig.template,
                     help="prompt template with {question} (default: the arithmetic template of the recipes)")
    gen.add_argument("--effort", type=effort_arg, help="e1 effort r in (0, 1]: the question gets the effort line")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--n", type=int, default=1, help="completions per question")
    gen.add_argument("--seed", type=int, help="sampling seed (reproducible sampling)")
    add_engine_arguments(gen)
    gen.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 where the hardware has fast bf16 (model.dtype: auto), else float32")
    reflex = gen.add_argument_group("CyclicReflex (reflection-token logit wave, algorithms.md section 8)")
    reflex.add_argument("--cyclic-reflex", action="store_true", help="add the triangular wave to reflection tokens")
    reflex.add_argument("--reflex-amplitude", type=float, default=1.0, metavar="A")
    reflex.add_argument("--reflex-period", type=int, default=600, metavar="P", help="in generated tokens")
    reflex.add_argument("--reflex-shift", type=float, default=0.0, metavar="S", help="phase shift, in periods")
    reflex.add_argument("--reflex-word", action="append", metavar="TOKEN",
                        help="reflection token, an exact vocabulary entry (repeatable; default: "
                        f"{' '.join(REFLECTION_WORDS)})")
    reflex.add_argument("--think-end", default="</think>",
                        help="the wave stops after this token (ignored if it is not a single vocabulary entry)")
    add_env_arguments(gen)
    gen.add_argument("--json", action="store_true", help="one JSON object per completion (with the prompt text); "
                     "with --env, per episode (its transcript and per-turn metrics)")
    gen.set_defaults(func=_generate)


def main(argv: list[str] | None = None) -> int:
    from reasonrl.malloc_tuning import tune_malloc

    tune_malloc()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:  # `reasonrl serve MODEL [options] -- [vLLM server options]`
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough and args.command != "serve":
        parser.error(f"arguments after -- are only for `reasonrl serve`: {passthrough}")
    args.passthrough = passthrough
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"reasonrl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
