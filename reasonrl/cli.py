"""`reasonrl` command line: train a recipe, evaluate a model or checkpoint, serve a model for rollouts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reasonrl.config import ConfigError, DataConfig, load_config

TASKS = ("arithmetic", "gsm8k")


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


def _eval(args) -> int:
    from reasonrl.data.tasks import load_task_rows
    from reasonrl.models import load_tokenizer
    from reasonrl.rollout.factory import build_engine
    from reasonrl.trainers.evaluate import greedy_accuracy

    data = eval_data_config(args)
    _, rows = load_task_rows(data)
    model_path = resolve_eval_model(args.model)
    tokenizer = load_tokenizer(model_path)
    if args.engine != "hf" and (Path(model_path) / "adapter_config.json").is_file():
        raise SystemExit("a LoRA checkpoint is evaluated with --engine hf (vLLM would need the merged model saved)")
    model = load_eval_model(model_path, args.dtype)
    engine_cfg = argparse.Namespace(engine=args.engine, batch_size=args.batch_size)
    engine = build_engine(engine_cfg, model=model, tokenizer=tokenizer, model_path=model_path,
                          model_dtype=args.dtype, seed=0)
    start = time.perf_counter()
    result = greedy_accuracy(engine, tokenizer, rows, template=data.template, max_new_tokens=args.max_new_tokens,
                             answer_mode=args.answer_mode)
    summary = {
        "model": model_path, "task": args.config or args.task, "n": int(result["n"]),
        "accuracy": result["correct"] / max(result["n"], 1), "mean_length": result["tokens"] / max(result["n"], 1),
        "max_new_tokens": args.max_new_tokens, "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"accuracy {summary['accuracy']:.1%} on {summary['n']} problems, mean length "
              f"{summary['mean_length']:.1f} tokens ({summary['seconds']} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonrl", description="RL training for reasoning LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe: reasonrl train recipes/X.yaml key=value ...")
    train.add_argument("recipe", nargs="?", help="recipe YAML (defaults apply without one)")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="greedy accuracy of a model, checkpoint or run folder")
    ev.add_argument("model", help="run folder, checkpoint folder, local HF folder, hub id or built-in name")
    ev.add_argument("--task", choices=TASKS, default="arithmetic")
    ev.add_argument("--config", help="take the eval split from this recipe's data section instead of --task")
    ev.add_argument("--data-path", help="gsm8k: local JSONL file (default: the hub data set openai/gsm8k)")
    ev.add_argument("--n", type=int, default=200, help="number of held-out problems")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--answer-mode", default="lenient", choices=["lenient", "hash", "boxed", "last_number"])
    ev.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--json", action="store_true", help="print one JSON line")
    ev.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    ev.set_defaults(func=_eval)
    from reasonrl.serve import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
