"""Rollout throughput: the same prompts through the `hf` engine, the `vllm` engine inside a trainer-like process, and
vLLM's own `LLM.generate` standalone; plus the weight-sync time of the `vllm` engine.

    .venv/bin/python scripts/bench_rollout.py                 # default: 64 prompts x 8 samples, up to 128 tokens
    .venv/bin/python scripts/bench_rollout.py --prompts 16 --json

The prompts are the default recipe's task (2-digit arithmetic, its chat template), sampled at temperature 1.0 with
fixed seeds; each dtype of --dtypes (default: float32 and bfloat16) gets every row, so bf16 is compared with fp32 side by
side (bf16 rows: the trainer's policy is float32 under bf16 autocast, as model.dtype=bfloat16 trains; the vLLM engines
run bf16, the weight sync casting). The script prints the CPU ISA torch reports and what model.dtype=auto picks. Every row's process
gets the malloc settings of the reasonrl entry points (reasonrl/malloc_tuning.py; REASONRL_MALLOC_TUNING=0 turns
them off), and the standalone row the same vLLM options as the engine on CPU (32-token KV blocks, the whole batch in
one decode wave), so the two vLLM rows differ only in how vLLM is hosted. Each
engine gets one untimed warm-up call. The hf and standalone rows run in fresh processes of their own (vLLM owns its
process there); the `vllm` engine shares its process with the trainer's HF model, as in training. --compile adds
both vLLM rows again with torch.compile (rollout.vllm_compile); the one-off compile is part of the engine start-up
(its own column), not of the timed generation. Numbers are generated tokens per second of wall time. With --json the last line is one JSON object
with the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
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


def bench_vllm_engine(model, model_path, tokenizer, prompts, params, max_new_tokens, dtype, sync_repeats,
                      compile_: bool) -> dict:
    from reasonrl.rollout.factory import eos_token_ids
    from reasonrl.rollout.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(model_path, dtype=dtype, eos_token_ids=eos_token_ids(tokenizer, model),
                        enforce_eager=not compile_, rollout_batch=len(prompts) * params.n)
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


def bench_standalone(model_path, prompts, params, max_new_tokens, dtype, compile_: bool) -> dict:
    """vLLM's LLM.generate with the same requests; run in a child process (see main)."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams

    from reasonrl.rollout.vllm_engine import _on_cpu, cpu_defaults

    # the engine's CPU settings, so the two rows differ only in how vLLM is hosted
    options = cpu_defaults(len(prompts) * params["n"]) if _on_cpu() else {}
    begin = time.perf_counter()
    llm = LLM(model=model_path, dtype=dtype, enforce_eager=not compile_, gpu_memory_utilization=0.3 if _on_cpu() else 0.5,
              seed=0, **options)
    startup = time.perf_counter() - begin
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
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "startup_s": startup}


def run_child(args, which: str, model_path: str, dtype: str, compile_: bool = False) -> dict:
    """One row in a fresh process, so that no engine inherits another's memory or threads (vLLM checks the free
    memory at start-up)."""
    cmd = [sys.executable, __file__, "--child", which, "--model", model_path, "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens), "--dtypes", dtype,
           "--seed", str(args.seed), "--hf-batch-size", str(args.hf_batch_size), "--sync-repeats",
           str(args.sync_repeats)]
    cmd += ["--compile"] if compile_ else []
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{done.stderr[-3000:]}")
    for line in reversed(done.stdout.splitlines()):  # vLLM logs to stdout too: the row is the last JSON line
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{which} run printed no result:\n{done.stdout[-2000:]}")


def child_row(args) -> dict:
    import torch

    from reasonrl.malloc_tuning import tune_malloc
    from reasonrl.models import load_model, load_tokenizer
    from reasonrl.precision import autocast_forward
    from reasonrl.rollout.base import SamplingParams

    tune_malloc()  # as the reasonrl entry points do, in every row's process

    tokenizer = load_tokenizer(args.model)
    prompts = task_prompts(tokenizer, args.prompts)
    if args.child == "standalone":
        params = {"n": args.samples, "temperature": 1.0, "seed": args.seed}
        return bench_standalone(args.model, prompts, params, args.max_new_tokens, args.dtypes, args.compile)
    # the trainer's policy (float32 masters, autocast to the run's dtype), next to the vllm engine
    model = autocast_forward(load_model(args.model, dtype="float32").eval(), args.dtypes)
    params = SamplingParams(n=args.samples, temperature=1.0, seed=args.seed)
    if args.child == "vllm":
        return bench_vllm_engine(model, args.model, tokenizer, prompts, params, args.max_new_tokens, args.dtypes,
                                 args.sync_repeats, args.compile)
    with torch.no_grad():
        return bench_hf(model, tokenizer, prompts, params, args.max_new_tokens, args.hf_batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--hf-batch-size", type=int, default=256, help="sequences the hf engine generates together")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="also both vLLM rows with torch.compile (rollout.vllm_compile=true)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["hf", "vllm", "standalone"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child_row(args)))
        return 0

    import torch

    from reasonrl.models import resolve_model_path
    from reasonrl.precision import cpu_isa_flags, resolve_precision

    model_path = resolve_model_path(args.model)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [False, True] if args.compile else [False]
    isa = {k: v for k, v in cpu_isa_flags().items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    print(f"CPU ISA (torch): {isa}; model.dtype=auto here: {resolve_precision('auto').describe()}", flush=True)
    rows, ratios = {}, {}
    for dtype in dtypes:
        rows[f"hf ({dtype})"] = run_child(args, "hf", model_path, dtype)
        for compiled in modes:
            tag = f"{dtype}, compiled" if compiled else dtype
            rows[f"vllm (in trainer, {tag})"] = run_child(args, "vllm", model_path, dtype, compiled)
            rows[f"vllm LLM.generate (standalone, {tag})"] = run_child(args, "standalone", model_path, dtype, compiled)
            engine, standalone = rows[f"vllm (in trainer, {tag})"], rows[f"vllm LLM.generate (standalone, {tag})"]
            key = f"{dtype}{'_compiled' if compiled else ''}"
            ratios[f"vllm_over_hf/{key}"] = engine["tokens_per_s"] / rows[f"hf ({dtype})"]["tokens_per_s"]
            ratios[f"vllm_over_standalone/{key}"] = engine["tokens_per_s"] / standalone["tokens_per_s"]
    print(f"\n{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, T=1.0, "
          f"{torch.get_num_threads()} threads, model {args.model}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}\n")
    print("| engine | generated tokens | seconds | tokens/s | engine start-up s | weight sync s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        startup = f"{row['startup_s']:.1f}" if "startup_s" in row else "-"
        sync = f"{row['weight_sync_s']:.3f}" if "weight_sync_s" in row else "-"
        print(f"| {name} | {row['tokens']} | {row['seconds']:.1f} | {row['tokens_per_s']:.0f} | {startup} | {sync} |")
    print()
    for key in (k.split("/", 1)[1] for k in ratios if k.startswith("vllm_over_hf/")):
        print(f"{key}: vllm engine / hf engine {ratios[f'vllm_over_hf/{key}']:.2f}x (target >= 4x); / standalone "
              f"vLLM {ratios[f'vllm_over_standalone/{key}']:.0%} (target >= 90%)")
    if "float32" in dtypes and "bfloat16" in dtypes:
        for name in [n for n in rows if n.endswith(("(float32)", ", float32)"))]:
            twin = name.replace("float32", "bfloat16")
            ratios[f"bf16_over_fp32/{name}"] = rows[twin]["tokens_per_s"] / rows[name]["tokens_per_s"]
            print(f"{twin} / {name}: {ratios[f'bf16_over_fp32/{name}']:.2f}x"
                  f"{' (target >= 1.5x with fast bf16)' if name.startswith('vllm (in trainer') else ''}")
    if args.json:
        print(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "child"}, "isa": isa,
                          "engines": rows, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
