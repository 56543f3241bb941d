"""`reasonrl eval --env` and `reasonrl generate --env`: multi-turn episodes with an environment (reasonrl/envs).

    reasonrl eval smollm2-135m-instruct --env calculator --max-turns 3 --json
    reasonrl generate smollm2-135m-instruct --env retry --env-args '{"max_tries": 2}' --prompts-file q.jsonl

Everything runs through the trainer's own pieces: the recipe's `env` section and its checks (`load_config`,
`validate_env`), `load_environment`, `build_runner`, `episode_accuracy` (eval), `EpisodeRunner.run` (generate),
and the records and metrics of reasonrl/envs/trajectories.py. `--env` names the environment as `env.source` and
`env.id` do: a built-in name (calculator, retry), `module:Class` (a python environment), or `verifiers:ID` (an
environment of the verifiers package, eval only: it brings its own prompts and rubric). Without --env, `reasonrl
eval --config RECIPE` runs the recipe's own `env` section, if it has one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from reasonrl.config import ConfigError, EnvConfig, RecipeConfig, RewardSpec, load_config
from reasonrl.envs import BUILTIN_ENVS

LIMITS = ("max_turns", "max_turn_tokens", "max_episode_tokens", "max_tool_calls", "tool_format")  # EnvConfig keys


def add_env_arguments(parser) -> None:
    default = EnvConfig()
    group = parser.add_argument_group("episodes (multi-turn environments, reasonrl/envs; the recipe's env section)")
    group.add_argument("--env", metavar="NAME",
                       help=f"run episodes with this environment: a built-in one ({', '.join(sorted(BUILTIN_ENVS))}), "
                       "module:Class (a python environment) or verifiers:ID (a verifiers environment; eval only)")
    group.add_argument("--env-args", metavar="JSON", help="the environment's keyword arguments, a JSON object")
    group.add_argument("--max-turns", type=int, help=f"assistant turns per episode (default {default.max_turns})")
    group.add_argument("--max-turn-tokens", type=int, help="tokens per assistant turn (default: --max-new-tokens)")
    group.add_argument("--max-episode-tokens", type=int,
                       help="tokens after the prompt, the model's and the environment's (default "
                       f"{default.max_episode_tokens})")
    group.add_argument("--max-tool-calls", type=int, help=f"tool calls per episode (default {default.max_tool_calls})")
    group.add_argument("--tool-format", choices=["auto", "hermes", "text"],
                       help="auto (default): hermes when the chat template has a tool format, else <tool>...</tool>")


def parse_env_spec(text: str) -> tuple[str, str]:
    """--env NAME -> (env.source, env.id): verifiers:ID, module:Class (python) or a built-in name."""
    if text.startswith("verifiers:"):
        return "verifiers", text.removeprefix("verifiers:")
    return ("python", text) if ":" in text else ("builtin", text)


def parse_env_args(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--env-args is not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--env-args must be a JSON object of keyword arguments, got {text!r}")  # noqa: TRY004 - a bad command line
    return value


def episode_config(args, recipe: str | None = None, overrides: list[str] = ()) -> RecipeConfig:
    """The recipe a command's episodes run with: `recipe`'s (or the defaults) with the --env options over its env
    section, checked as the trainer checks it. env.source stays none when neither names an environment."""
    limits = [f"env.{key}={getattr(args, key)}" for key in LIMITS if getattr(args, key) is not None]
    config = load_config(recipe, [*overrides, *limits])
    if args.env is not None:
        source, env_id = parse_env_spec(args.env)
        config.env = dataclasses.replace(config.env, source=source, id=env_id, args={})
    if args.env_args is not None:
        config.env.args = parse_env_args(args.env_args)
    if config.env.source == "none":
        given = [f"--{key.replace('_', '-')}" for key in (*LIMITS, "env_args") if getattr(args, key) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} set the episodes of an environment: give --env NAME")
        return config
    if recipe is None:  # the command grades an episode by the environment's score where it has one
        config.rewards = [RewardSpec(), RewardSpec(name="env")]
    from reasonrl.trainers.validation import validate_env

    validate_env(config)
    return config


def check_single_turn_options(args) -> None:
    """Options that write into a single completion, which episodes do not have."""
    if args.effort is not None:
        raise ValueError("--effort writes the effort line into a single-turn prompt; it does not run with --env")
    if getattr(args, "cyclic_reflex", False):
        raise ValueError("--cyclic-reflex counts the tokens of one completion; it does not run with --env")


def cli_environment(config: RecipeConfig):
    """The environment of the env section; wrong --env-args (a TypeError of its constructor) as a clear error."""
    from reasonrl.envs import load_environment

    e = config.env
    try:
        return load_environment(e.source, e.id, e.args)
    except TypeError as err:
        raise ValueError(f"env.id={e.id!r} with env.args={e.args}: {err}") from err


def cli_runner(config: RecipeConfig, env, engine, tokenizer, *, template: str, max_new_tokens: int):
    """The trainer's episode runner for a command's engine (its EOS ids are the engine's own)."""
    from reasonrl.envs import build_runner

    return build_runner(config.env, env=env, tokenizer=tokenizer, eos_ids=engine.eos_token_ids, template=template,
                        max_new_tokens=max_new_tokens)


def episode_summary(episodes, tokenizer) -> dict[str, float]:
    """The trainer's episode metrics (tool-call rate, mean turns and tool calls, tool error rate, ...), unprefixed."""
    from reasonrl.envs.trajectories import episode_metrics, episode_record, episode_sums

    metrics = episode_metrics(episode_sums([episode_record(e, tokenizer) for e in episodes]))
    return {key.removeprefix("episode/"): value for key, value in metrics.items()}


def eval_episodes(args, config: RecipeConfig) -> int:
    """`reasonrl eval --env`: greedy episodes on the eval rows (`episode_accuracy`, as the trainer's eval)."""
    from reasonrl.cli import build_cli_engine, close_engine, eval_data_config, eval_rollout_config, resolve_eval_model
    from reasonrl.data.tasks import task_rows
    from reasonrl.envs.trajectories import episode_transcript
    from reasonrl.models import load_tokenizer
    from reasonrl.trainers.evaluate import episode_accuracy

    check_single_turn_options(args)
    config.data = eval_data_config(args)
    env = cli_environment(config)
    _, rows = task_rows(config, env)
    model_path = resolve_eval_model(args.model)
    tokenizer = load_tokenizer(model_path)
    rollout = eval_rollout_config(args)
    engine = build_cli_engine(rollout, model_path, tokenizer, dtype=args.dtype)
    start = time.perf_counter()
    try:
        runner = cli_runner(config, env, engine, tokenizer, template=config.data.template,
                            max_new_tokens=args.max_new_tokens)
        try:
            result = episode_accuracy(runner, engine, tokenizer, rows, answer_mode=args.answer_mode)
        finally:
            runner.close()
    finally:
        close_engine(engine)
    n = max(result["n"], 1)
    summary = {
        "model": model_path, "task": args.config or args.task, "engine": rollout.engine, "n": int(result["n"]),
        "env": {"source": config.env.source, "id": config.env.id, "args": config.env.args},
        "accuracy": result["correct"] / n, "mean_length": result["tokens"] / n, "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - start, 1), **episode_summary(result["episodes"], tokenizer),
    }
    if args.json:
        records = [{"question": s["question"], "answer": s["answer"], "correct": s["correct"],
                    **episode_transcript(e, tokenizer)} for s, e in zip(result["samples"], result["episodes"])]
        print(json.dumps({**summary, "records": records}))
        return 0
    print(f"accuracy {summary['accuracy']:.1%} on {summary['n']} problems, mean length {summary['mean_length']:.1f} "
          f"model tokens ({summary['seconds']} s)")
    print(f"episodes: tool-call rate {summary['tool_call_rate']:.1%}, mean turns {summary['turns_mean']:.2f}, mean "
          f"tool calls {summary['tool_calls_mean']:.2f}, tool error rate {summary['tool_error_rate']:.1%}, truncated "
          f"{summary['truncated_frac']:.1%}")
    return 0


def generate_episodes(args, config: RecipeConfig, rows: list[dict]) -> int:
    """`reasonrl generate --env`: --n episodes per question (sampled, or greedy at --temperature 0), each printed
    with its transcript and per-turn metrics."""
    from reasonrl.cli import build_cli_engine, cli_rollout_config, close_engine, resolve_eval_model
    from reasonrl.models import load_tokenizer
    from reasonrl.rollout.base import SamplingParams

    check_single_turn_options(args)
    if config.env.source == "verifiers":
        raise ValueError("a verifiers environment brings its own prompts and rubric: run it with `reasonrl eval "
                         "--env verifiers:ID`")
    env = cli_environment(config)
    model_path = resolve_eval_model(args.model)
    tokenizer = load_tokenizer(model_path)
    engine = build_cli_engine(cli_rollout_config(args), model_path, tokenizer, dtype=args.dtype, seed=args.seed or 0)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    start = time.perf_counter()
    try:
        runner = cli_runner(config, env, engine, tokenizer, template=args.template, max_new_tokens=args.max_new_tokens)
        try:
            episodes = runner.run(engine, rows, params, group_size=args.n)
        finally:
            runner.close()
    finally:
        close_engine(engine)
    seconds = time.perf_counter() - start
    for k, episode in enumerate(episodes):
        print_episode(episode, tokenizer, rows, k, args)
    summary = episode_summary(episodes, tokenizer)
    if not args.json:
        tokens = sum(e.model_tokens for e in episodes)
        print(f"{len(episodes)} episodes, {tokens} model tokens in {seconds:.1f} s; mean turns "
              f"{summary['turns_mean']:.2f}, tool-call rate {summary['tool_call_rate']:.1%}", file=sys.stderr)
    return 0


def print_episode(episode, tokenizer, rows: list[dict], k: int, args) -> None:
    """Episode `k` (prompt-major, --n per question): one JSON object, or its conversation after the prompt."""
    from reasonrl.envs.trajectories import episode_transcript, model_turn_starts

    i, j = divmod(k, args.n)
    record = episode_transcript(episode, tokenizer)
    if args.json:
        print(json.dumps({"prompt_index": i, "completion_index": j, "question": rows[i]["question"],
                          "prompt": tokenizer.decode(episode.prompt_ids), **record}), flush=True)
        return
    if j == 0:
        print(f"=== prompt {i + 1}/{len(rows)}: {rows[i]['question']!r}")
    print(f"--- episode {j + 1}/{args.n} ({record['turns']} turns, {record['tool_calls']} tool calls, "
          f"{record['model_tokens']} model tokens, {record['finish_reason']}, reward {record['reward']})")
    turns = iter(record["per_turn"])
    starts = model_turn_starts(episode)
    first_turn = starts[0] if starts else len(record["messages"])
    for message in record["messages"][first_turn:]:  # the prompt's messages are in the JSON output
        if message["role"] == "assistant":
            turn = next(turns)
            print(f"[assistant, turn {turn['turn']}: {turn['tokens']} tokens, {turn['tool_calls']} tool calls]")
        else:
            print(f"[{message['role']}]")
        print(message["content"], flush=True)
