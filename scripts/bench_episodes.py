"""Multi-turn episodes vs single-turn completions on the vllm engine: episodes/s, generated tokens/s and vLLM's
prefix-cache hit rate.

    .venv/bin/python scripts/bench_episodes.py                       # 64 episodes x 3 turns, SmolLM2-135M-Instruct
    .venv/bin/python scripts/bench_episodes.py --episodes 16 --json

Episodes: the first --episodes problems of the default task (recipes/grpo_smollm2_arith.yaml: its rows and chat
template), one episode each, through the EpisodeRunner (reasonrl/envs/episodes.py) on one in-process VLLMEngine,
sampled at --temperature with a seed. The environment answers every turn ("Check your answer and give it again."),
so the runner's max_turns (--turns) ends each episode: exactly --turns model turns, unless a turn runs out of its
--max-turn-tokens budget (the runner then ends that episode; the table counts the episodes with all turns). So that
turns end before their budget, a turn also ends at a stop string (--stop, default a newline: the model's first line
or its EOS, whichever comes first). Every round of the
runner is one batched engine call continuing each episode from its token prefix, so vLLM's prefix cache serves what
an episode already holds.

Single-turn baselines, the same model tokens without the episodes: for every model turn of every episode, one
completion of that episode's first prompt, sampled the same way (same engine, same stop strings) and forced to the
turn's exact length (vLLM min_tokens = max_tokens = the turn's token count), so both sides generate exactly the same
number of tokens in sequences of the same lengths. `single-turn` sends all of them (episodes x turns completions) in
one call, as a single-turn GRPO step would; `single-turn, in rounds` sends them in --turns calls, turn k's lengths in
call k, as the runner's rounds are shaped (it isolates what continuing from a long prefix costs from how many
sequences decode together). ratio = episode tokens/s / single-turn tokens/s (the issue's target: >= 0.8); ratio_rounds
the same against the rounds row. Tokens/s counts generated (model) tokens only, over the wall time of the phase
(episodes: the whole runner, environment and template work included). The prefix cache is reset before each phase;
its hit rate is vLLM's own counters (vllm:prefix_cache_hits / vllm:prefix_cache_queries, prompt tokens found in the
cache / prompt tokens looked up) over the phase, so the engine starts with log stats on (disable_log_stats=False).
One untimed warm-up call first. The CPU's ISA and the dtype are printed with the table; the numbers are wall time on
whatever else the machine is running. With --json the last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reasonrl.envs.base import Environment

RECIPE = REPO / "recipes" / "grpo_smollm2_arith.yaml"
REPLY = "Check your answer and give it again."
HITS, QUERIES = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"


class KeepGoing(Environment):
    """Answers every assistant turn: the runner's max_turns is what ends an episode."""

    def respond(self, state, text):
        return [{"role": "user", "content": REPLY}]


class CountedCalls:
    """The engine as the runner sees it, counting its calls and the sequences of each."""

    def __init__(self, engine):
        self.engine, self.sizes = engine, []

    def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
        self.sizes.append(len(prompt_ids))
        return self.engine.generate(prompt_ids, params, max_new_tokens, logits_processors)


def turn_lengths(sampled: list[bool]) -> list[int]:
    """The token count of each model turn: the runs of True in an episode's `sampled` flags."""
    lengths, before = [], False
    for flag in sampled:
        if flag and before:
            lengths[-1] += 1
        elif flag:
            lengths.append(1)
        before = flag
    return lengths


def cache_counts(metrics) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, summed over engines, from `LLM.get_metrics()`."""
    totals = {HITS: 0.0, QUERIES: 0.0}
    for metric in metrics:
        if metric.name in totals:
            totals[metric.name] += metric.value
    return totals[HITS], totals[QUERIES]


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Prefix-cache hits / queries between two `cache_counts` (None: nothing was looked up)."""
    hits, queries = after[0] - before[0], after[1] - before[1]
    return hits / queries if queries > 0 else None


def task_rows(count: int) -> tuple[list[dict], str]:
    """The default task's first `count` training rows and its prompt template."""
    from reasonrl.config import load_config
    from reasonrl.data.tasks import load_task_rows

    config = load_config(str(RECIPE), [])
    rows, _ = load_task_rows(config.data)
    if len(rows) < count:
        raise SystemExit(f"the task has {len(rows)} rows, fewer than --episodes {count}")
    return rows[:count], config.data.template


def start_engine(args, model_path: str, tokenizer):
    from reasonrl.rollout.factory import eos_token_ids
    from reasonrl.rollout.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(model_path, dtype=args.dtype, eos_token_ids=eos_token_ids(tokenizer, model_path),
                        kv_cache_memory_bytes=args.kv_cache_bytes, rollout_batch=args.episodes * args.turns,
                        disable_log_stats=False)  # the prefix-cache counters need vLLM's stat loggers
    return engine, time.perf_counter() - start


def timed_phase(engine, work) -> dict:
    """Run `work()` on a cold prefix cache; its wall time, its result and the cache's hit rate over it."""
    engine.llm.reset_prefix_cache()
    before = cache_counts(engine.llm.get_metrics())
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "result": result, "hit_rate": hit_rate(before, cache_counts(engine.llm.get_metrics()))}


def run_episodes(args, engine, tokenizer, rows: list[dict], template: str) -> dict:
    from reasonrl.envs.episodes import EpisodeLimits, EpisodeRunner
    from reasonrl.rollout.base import SamplingParams

    limits = EpisodeLimits(max_turns=args.turns, max_turn_tokens=args.max_turn_tokens,
                           max_episode_tokens=args.turns * args.max_turn_tokens + 512)
    runner = EpisodeRunner(KeepGoing(), tokenizer, limits=limits, template=template,
                           eos_ids=set(engine.eos_token_ids))
    params = SamplingParams(temperature=args.temperature, seed=args.seed, stop=tuple(args.stop))
    counted = CountedCalls(engine)
    try:
        phase = timed_phase(engine, lambda: runner.run(counted, rows, params, group_size=1))
    finally:
        runner.close()
    episodes = phase.pop("result")
    turns = [turn_lengths(e.sampled) for e in episodes]
    tokens = sum(e.model_tokens for e in episodes)
    return {**phase, "episodes": len(episodes), "tokens": tokens, "env_tokens": sum(e.env_tokens for e in episodes),
            "full_episodes": sum(len(t) == args.turns for t in turns), "turns_mean": sum(map(len, turns)) / len(turns),
            "turn_tokens_mean": tokens / max(1, sum(map(len, turns))), "tokens_per_s": tokens / phase["seconds"],
            "episodes_per_s": len(episodes) / phase["seconds"], "calls": len(counted.sizes),
            "call_sizes": counted.sizes, "prompts": [e.prompt_ids for e in episodes], "turns": turns}


def forced_requests(args, engine, prompts: list[list[int]], lengths: list[int], seed: int):
    """vLLM requests of the given prompts, each forced to its length (min_tokens = max_tokens)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = [VLLMSamplingParams(temperature=args.temperature, seed=seed + i, max_tokens=length, min_tokens=length,
                                   stop_token_ids=engine.eos_token_ids, stop=list(args.stop) or None,
                                   include_stop_str_in_output=True, logprobs=0, detokenize=bool(args.stop),
                                   output_kind=RequestOutputKind.FINAL_ONLY)
                for i, length in enumerate(lengths)]
    return [{"prompt_token_ids": list(p)} for p in prompts], sampling


def run_single_turn(args, engine, episodes: dict, *, rounds: bool) -> dict:
    """The episodes' model turns again as single-turn completions of their first prompts (module docstring)."""
    calls = []
    for k in range(args.turns if rounds else 1):
        picked = [(prompt, lengths[j]) for prompt, lengths in zip(episodes["prompts"], episodes["turns"])
                  for j in range(len(lengths)) if not rounds or j == k]
        if picked:
            calls.append(forced_requests(args, engine, [p for p, _ in picked], [n for _, n in picked],
                                         seed=args.seed + 100_003 * (k + 1)))

    def work():
        return [engine.llm.generate(requests, sampling, use_tqdm=False) for requests, sampling in calls]

    phase = timed_phase(engine, work)
    tokens = sum(len(c.token_ids) for results in phase.pop("result") for r in results for c in r.outputs)
    return {**phase, "completions": sum(len(requests) for requests, _ in calls), "calls": len(calls),
            "tokens": tokens, "tokens_per_s": tokens / phase["seconds"]}


def print_table(args, rows: dict, header: str) -> None:
    print(f"\n{header}\n")
    print("| run | engine calls | sequences | generated tokens | seconds | tokens/s | episodes/s | prefix-cache hits |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        rate = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.1%}"
        per_s = f"{row['episodes_per_s']:.2f}" if "episodes_per_s" in row else "-"
        sequences = row.get("completions", row.get("episodes"))
        print(f"| {name} | {row['calls']} | {sequences} | {row['tokens']} | {row['seconds']:.1f} | "
              f"{row['tokens_per_s']:.0f} | {per_s} | {rate} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, HF folder or hub id")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="model turns per episode (the runner's max_turns)")
    parser.add_argument("--max-turn-tokens", type=int, default=128, help="token budget of each model turn")
    parser.add_argument("--stop", action="append", default=None,
                        help="a stop string ending a turn (repeatable; default a newline)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the engine's dtype; auto: bfloat16 where the hardware has fast bf16, else float32")
    parser.add_argument("--kv-cache-bytes", type=int, default=2_000_000_000, help="vLLM's KV cache (the recipe's)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = parser.parse_args(argv)
    args.stop = ["\n"] if args.stop is None else args.stop
    return args


def summary(args, isa: dict, startup_s: float, episodes: dict, single: dict, rounds: dict) -> dict:
    return {
        "config": vars(args), "isa": isa, "startup_s": startup_s,
        "episodes_per_s": episodes["episodes_per_s"], "tokens_per_s": episodes["tokens_per_s"],
        "single_turn_tokens_per_s": single["tokens_per_s"], "single_turn_rounds_tokens_per_s": rounds["tokens_per_s"],
        "ratio": episodes["tokens_per_s"] / single["tokens_per_s"],
        "ratio_rounds": episodes["tokens_per_s"] / rounds["tokens_per_s"],
        "prefix_cache_hit_rate": episodes["hit_rate"], "single_turn_prefix_cache_hit_rate": single["hit_rate"],
        "tokens": episodes["tokens"], "single_turn_tokens": single["tokens"], "single_turn_rounds_tokens": rounds["tokens"],
        "env_tokens": episodes["env_tokens"], "episodes": episodes["episodes"], "full_episodes": episodes["full_episodes"],
        "turns_mean": episodes["turns_mean"], "turn_tokens_mean": episodes["turn_tokens_mean"],
        "episode_call_sizes": episodes["call_sizes"],
        "seconds": {name: row["seconds"] for name, row in (("episodes", episodes), ("single_turn", single),
                                                            ("single_turn_rounds", rounds))},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from reasonrl.data.prompts import encode_prompt
    from reasonrl.models import load_tokenizer, resolve_model_path
    from reasonrl.precision import cpu_isa_flags, resolve_precision
    from reasonrl.rollout.base import SamplingParams

    if args.dtype == "auto":
        args.dtype = resolve_precision("auto").dtype
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    rows, template = task_rows(args.episodes)
    engine, startup_s = start_engine(args, model_path, tokenizer)
    try:
        engine.generate([encode_prompt(tokenizer, rows[0]["question"], template)], SamplingParams(temperature=0.0),
                        [8])  # warm-up
        episodes = run_episodes(args, engine, tokenizer, rows, template)
        single = run_single_turn(args, engine, episodes, rounds=False)
        rounds = run_single_turn(args, engine, episodes, rounds=True)
    finally:
        engine.close()
    isa = {k: v for k, v in cpu_isa_flags().items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    header = (f"{args.episodes} episodes x {args.turns} turns (up to {args.max_turn_tokens} tokens each), T="
              f"{args.temperature}, model {args.model}, {args.dtype}, {torch.get_num_threads()} threads, CPU ISA {isa}; "
              f"{episodes['full_episodes']}/{episodes['episodes']} episodes had all {args.turns} turns, "
              f"{episodes['turn_tokens_mean']:.1f} tokens per turn, engine start-up {startup_s:.0f} s")
    table = {"episodes": episodes, "single-turn": single, "single-turn, in rounds": rounds}
    print_table(args, table, header)
    result = summary(args, isa, startup_s, episodes, single, rounds)
    print(f"\nratio (episode tokens/s / single-turn tokens/s): {result['ratio']:.2f} (target >= 0.8); against the "
          f"rounds row: {result['ratio_rounds']:.2f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
