"""Rollout throughput: the same prompts through the `hf` engine, the `vllm` engine inside a trainer-like process, and
vLLM's own `LLM.generate` standalone; plus the weight-sync time of the `vllm` engine.

    .venv/bin/python scripts/bench_rollout.py                 # default: 64 prompts x 8 samples, up to 128 tokens
    .venv/bin/python scripts/bench_rollout.py --prompts 16 --json

The prompts are the default recipe's task (2-digit arithmetic, its chat template), sampled at temperature 1.0 with
fixed seeds; every engine runs the model in the same dtype (fp32 by default, as the default recipe on CPU). Each
engine gets one untimed warm-up call. The standalone run is a separate process (vLLM owns its process there); the
`vllm` engine shares its process with the trainer's HF model, as in training. Numbers are generated tokens per
second of wall time. With --json the last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def task_prompts(tokenizer, count: int) -> list[list[int]]:
    from reasonrl.config import load_config
    from reasonrl.data.prompts import encode_prompt
    from reasonrl.data.tasks import load_task_rows

    config = load_config(str(REPO / "recipes" / "grpo_smollm2_arith.yaml"), [])
    train_rows, _ = load_task_rows(config.data)
    return [encode_prompt(tokenizer, row["question"], config.data.template) for row in train_rows[:count]]


def timed_generate(engine, prompts, params, max_new_tokens) -> dict:
    start = time.perf_counter()
    out = engine.generate(prompts, params, [max_new_tokens] * len(prompts))
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in out.completion_ids)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_hf(model, tokenizer, prompts, params, max_new_tokens, batch_size) -> dict:
    from reasonrl.rollout.factory import eos_token_ids
    from reasonrl.rollout.hf import HFEngine

    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos_token_ids(tokenizer, model),
                      batch_size=batch_size)
    timed_generate(engine, prompts[:2], params, 8)  # warm-up
    return timed_generate(engine, prompts, params, max_new_tokens)


def bench_vllm_engine(model, model_path, tokenizer, prompts, params, max_new_tokens, dtype, sync_repeats) -> dict:
    from reasonrl.rollout.factory import eos_token_ids
    from reasonrl.rollout.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(model_path, dtype=dtype, eos_token_ids=eos_token_ids(tokenizer, model))
    startup = time.perf_counter() - start
    try:
        timed_generate(engine, prompts[:2], params, 8)  # warm-up
        result = timed_generate(engine, prompts, params, max_new_tokens)
        syncs = []
        for _ in range(sync_repeats):
            start = time.perf_counter()
            engine.load_weights(model.named_parameters())
            syncs.append(time.perf_counter() - start)
        result.update(startup_s=startup, weight_sync_s=statistics.median(syncs), weight_sync_all_s=syncs)
    finally:
        engine.close()
    return result


def bench_standalone(model_path, prompts, params, max_new_tokens, dtype) -> dict:
    """vLLM's LLM.generate with the same requests; run in a child process (see main)."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams

    from reasonrl.rollout.vllm_engine import _on_cpu

    options = {"enable_chunked_prefill": False} if _on_cpu() else {}
    llm = LLM(model=model_path, dtype=dtype, enforce_eager=True, gpu_memory_utilization=0.3 if _on_cpu() else 0.5,
              seed=0, **options)
    eos = [llm.get_tokenizer().eos_token_id]

    def requests(count, budget):
        sampling = [VLLMSamplingParams(n=params["n"], temperature=params["temperature"], seed=params["seed"] + i *
                                       params["n"], max_tokens=budget, stop_token_ids=eos, logprobs=0)
                    for i in range(count)]
        return [{"prompt_token_ids": p} for p in prompts[:count]], sampling

    llm.generate(*requests(2, 8), use_tqdm=False)  # warm-up
    batch, sampling = requests(len(prompts), max_new_tokens)
    start = time.perf_counter()
    results = llm.generate(batch, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_child(args, model_path) -> dict:
    cmd = [sys.executable, __file__, "--child-standalone", model_path, "--prompts", str(args.prompts), "--samples",
           str(args.samples), "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype, "--seed",
           str(args.seed)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"standalone vLLM run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hf-batch-size", type=int, default=256, help="sequences the hf engine generates together")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child-standalone", metavar="MODEL_PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    from reasonrl.models import load_model, load_tokenizer, resolve_model_path
    from reasonrl.rollout.base import SamplingParams

    if args.child_standalone:
        prompts = task_prompts(load_tokenizer(args.child_standalone), args.prompts)
        params = {"n": args.samples, "temperature": 1.0, "seed": args.seed}
        print(json.dumps(bench_standalone(args.child_standalone, prompts, params, args.max_new_tokens, args.dtype)))
        return 0

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=args.dtype).eval()
    prompts = task_prompts(tokenizer, args.prompts)
    params = SamplingParams(n=args.samples, temperature=1.0, seed=args.seed)
    with torch.no_grad():
        hf = bench_hf(model, tokenizer, prompts, params, args.max_new_tokens, args.hf_batch_size)
    engine = bench_vllm_engine(model, model_path, tokenizer, prompts, params, args.max_new_tokens, args.dtype,
                               args.sync_repeats)
    standalone = run_child(args, model_path)

    rows = {"hf": hf, "vllm (in trainer)": engine, "vllm LLM.generate (standalone)": standalone}
    ratios = {"vllm_over_hf": engine["tokens_per_s"] / hf["tokens_per_s"],
              "vllm_over_standalone": engine["tokens_per_s"] / standalone["tokens_per_s"]}
    print(f"\n{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, T=1.0, "
          f"{args.dtype}, {torch.get_num_threads()} threads, model {args.model}\n")
    print("| engine | generated tokens | seconds | tokens/s |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens']} | {row['seconds']:.1f} | {row['tokens_per_s']:.0f} |")
    print(f"\nvllm engine / hf engine: {ratios['vllm_over_hf']:.2f}x (target >= 4x)")
    print(f"vllm engine / standalone vLLM: {ratios['vllm_over_standalone']:.0%} (target >= 90%)")
    print(f"weight sync (vllm engine, median of {args.sync_repeats}): {engine['weight_sync_s']:.3f} s "
          f"(target < 1 s); engine start-up {engine['startup_s']:.1f} s")
    if args.json:
        print(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "child_standalone"},
                          "engines": rows, "ratios": ratios, "weight_sync_s": engine["weight_sync_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
