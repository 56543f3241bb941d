"""Training throughput: one fixed rollout batch of the default task through a plain PyTorch loop (the ceiling) and the
trainer's training phase (`train_on_batch`) in several layouts: padded vs packed forward, gradient checkpointing,
full fine-tuning vs LoRA, and DeepSpeed ZeRO-2/3 on 2 processes.

    .venv/bin/python scripts/bench_train.py                       # every configuration, 3 timed steps each
    .venv/bin/python scripts/bench_train.py --configs plain,padded,packing --steps 5 --json

The batch (default 8 prompts x 8 samples, up to 64 new tokens, sampled at T=1.0 by the hf engine from the real
model with a fixed seed, scored and given GRPO advantages as the trainer does) is made once and cached under --out,
so every configuration trains on the very same rows. Each configuration runs in its own process (peak memory is
that process's max RSS; with 2 processes the max over ranks; on CUDA also the allocator peak): 1 warm-up step, then
--steps timed optimizer steps. tokens/s = model-input tokens of the batch (prompt + completion of every row, the
same count for every configuration) / mean step time. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "recipes" / "arith" / "grpo.yaml"  # the default task with the hf engine and a constant lr, pinned
ZERO = REPO / "recipes" / "accelerate"
# name: (table label, recipe overrides, accelerate launch config for 2 processes or None)
FP32 = "model.dtype=float32"  # the recipe says auto: the fp32 rows pin it
CONFIGS = {
    "plain": ("plain loop", [FP32], None),
    "padded": ("trainer (padded)", [FP32], None),
    "packing": ("trainer (packing)", ["optim.packing=true", FP32], None),
    "checkpointing": ("trainer (grad checkpointing)", ["model.gradient_checkpointing=true", FP32], None),
    "lora": ("trainer LoRA", ["model.lora.enabled=true", FP32], None),
    "zero2": ("trainer ZeRO-2 (2 proc)", [FP32], ZERO / "zero2.yaml"),
    "zero3": ("trainer ZeRO-3 (2 proc)", [FP32], ZERO / "zero3.yaml"),
    # mixed precision (bf16 autocast over float32 masters; DeepSpeed: its bf16 mode): worth it with AVX512_BF16/AMX
    "padded_bf16": ("trainer bf16 (padded)", ["model.dtype=bfloat16"], None),
    "packing_bf16": ("trainer bf16 (packing)", ["optim.packing=true", "model.dtype=bfloat16"], None),
    "zero2_bf16": ("trainer bf16 ZeRO-2 (2 proc)", ["model.dtype=bfloat16"], ZERO / "zero2.yaml"),
}
FP32_ROW = {"padded_bf16": "padded", "packing_bf16": "packing", "zero2_bf16": "zero2"}  # for the bf16 / fp32 ratio


def recipe(args, overrides=()):
    from reasonrl.config import load_config

    return load_config(RECIPE, [f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.samples}",
                                f"rollout.max_new_tokens={args.max_new_tokens}", *overrides])


def sample_batch(args, config):
    """The hf engine's completions of the first --prompts task rows, as a RolloutBatch (as GRPOTrainer._generate)."""
    from reasonrl.batch import RolloutBatch
    from reasonrl.data.prompts import encode_prompt
    from reasonrl.data.tasks import load_task_rows
    from reasonrl.models import load_model, load_tokenizer, resolve_model_path
    from reasonrl.rollout.base import SamplingParams
    from reasonrl.rollout.factory import build_engine

    path, g = resolve_model_path(config.model.name_or_path), args.samples
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype="float32").eval()  # the same batch for every row: sampled in fp32
    rows = load_task_rows(config.data)[0][: args.prompts]
    prompts = [encode_prompt(tokenizer, row["question"], config.data.template) for row in rows]
    engine = build_engine(config.rollout, model=model, tokenizer=tokenizer, model_path=path,
                          model_dtype="float32", seed=args.seed)
    params = SamplingParams(n=g, temperature=config.rollout.temperature, seed=args.seed)
    with torch.no_grad():
        out = engine.generate(prompts, params, [args.max_new_tokens] * len(prompts))
    lengths = torch.tensor(list(map(len, out.completion_ids)))
    ids = torch.full((len(lengths), max(1, int(lengths.max()))), tokenizer.pad_token_id, dtype=torch.long)
    for i, tok in enumerate(out.completion_ids):
        ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
    batch = RolloutBatch(prompt_ids=[p for p in prompts for _ in range(g)], completion_ids=ids,
                         completion_mask=torch.arange(ids.shape[1])[None] < lengths[:, None], rollout_logprobs=None,
                         finish_reasons=out.finish_reasons, group_size=g)
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    return batch, rows, texts, tokenizer.pad_token_id


def make_batch(args) -> dict:
    """Sample, score and compute GRPO advantages and the loss mask, as `GRPOTrainer.train_step` does."""
    import functools

    from reasonrl.rewards.combine import resolve_reward, score_batch
    from reasonrl.rl.advantages import compute_advantages
    from reasonrl.trainers.prepare import loss_mask_for

    config, g = recipe(args), args.samples
    batch, rows, texts, pad_id = sample_batch(args, config)
    funcs = [(s.name, functools.partial(resolve_reward(s.name), **s.args), s.weight) for s in config.rewards]
    total, valid, _, _, _ = score_batch(funcs, texts, {k: [row[k] for row in rows for _ in range(g)] for k in rows[0]})
    a, valid = config.algorithm, torch.tensor(valid)
    advantages, _ = compute_advantages(
        torch.tensor(total).float(), estimator=a.advantage, group_size=g, valid=valid,
        lengths=batch.completion_mask.sum(-1).float(), eps=a.std_eps, unbiased_std=a.unbiased_std,
        scale=a.scale_rewards, fallback_threshold=a.hapo.fallback_threshold)
    fallback = not bool(advantages.abs().sum())
    if fallback:  # no group has a reward spread: train on a fixed random signal instead of skipping every row
        advantages = torch.randn(len(total), generator=torch.Generator().manual_seed(args.seed))
    batch.loss_mask = loss_mask_for(batch, valid, mask_truncated=a.overlong.mask_truncated)
    return {"key": batch_key(args), "batch": batch, "advantages": advantages, "random_advantages": fallback,
            "pad_id": pad_id}


def batch_key(args) -> list:
    return [args.prompts, args.samples, args.max_new_tokens, args.seed]


def load_batch(path: Path) -> dict:
    """The cached batch file, unpickled with weights_only (only RolloutBatch is allowed beside tensors)."""
    from reasonrl.batch import RolloutBatch

    with torch.serialization.safe_globals([RolloutBatch]):
        return torch.load(path, weights_only=True)


def cached_batch(args) -> dict:
    path = Path(args.out) / "batch.pt"
    if path.is_file():
        saved = load_batch(path)
        if saved["key"] == batch_key(args):
            return saved
    saved = make_batch(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return saved


def batch_tokens(batch) -> int:
    """Model-input tokens of the batch: every row's prompt and real completion tokens."""
    return sum(map(len, batch.prompt_ids)) + int(batch.completion_mask.sum())


def plain_setup(args, config, saved):
    """A hand-written loop: right-padded prompt+completion, full forward, -(A * logp) token mean, AdamW."""
    from reasonrl.models import load_model, resolve_model_path

    model = load_model(resolve_model_path(config.model.name_or_path), dtype="float32").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    batch, adv, pad = saved["batch"], saved["advantages"], saved["pad_id"]
    rows = [list(p) + batch.completion_ids[i][batch.completion_mask[i]].tolist() for i, p in enumerate(batch.prompt_ids)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)  # positions holding a trained completion token
    trained = batch.trained_mask()
    for i, (row, prompt) in enumerate(zip(rows, batch.prompt_ids)):
        ids[i, : len(row)] = torch.tensor(row)
        scored[i, len(prompt) : len(row)] = trained[i, : len(row) - len(prompt)]
    attention = (torch.arange(width)[None] < torch.tensor(list(map(len, rows)))[:, None]).long()
    total = scored.sum()  # the token mean's denominator: loss tokens of the whole batch

    def step():
        for idx in torch.arange(len(rows)).split(config.optim.micro_batch_size):
            logits = model(input_ids=ids[idx], attention_mask=attention[idx]).logits[:, :-1].float()
            logp = logits.log_softmax(-1).gather(-1, ids[idx, 1:, None]).squeeze(-1)
            (-(adv[idx, None] * logp * scored[idx, 1:]).sum() / total).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return None, step


def trainer_setup(args, config, saved):
    """The trainer's model set-up (as GRPOTrainer.__init__) and one `train_on_batch` call per step on this rank's
    share of the rows."""
    from reasonrl.models import load_policy, resolve_model_path
    from reasonrl.precision import resolve_precision
    from reasonrl.trainers.distributed import build_accelerator, configure_deepspeed, zero_stage
    from reasonrl.trainers.optimization import build_optimizer, build_scheduler
    from reasonrl.trainers.step import train_on_batch

    acc = build_accelerator(config.trainer.collective_timeout_s)
    precision = resolve_precision(config.model.dtype, acc.device)
    model = load_policy(resolve_model_path(config.model.name_or_path), config.model, compute_dtype=precision.dtype)
    optimizer = build_optimizer(model, config.optim)
    if zero_stage(acc) is not None:
        configure_deepspeed(acc, max_grad_norm=config.optim.max_grad_norm, bf16=precision.mixed)
    model, optimizer = acc.prepare(model, optimizer)
    n = saved["batch"].num_rows
    scheduler = build_scheduler(optimizer, config.optim, total_steps=args.steps + 1, sequences_per_step=n)
    mine = torch.arange(acc.process_index * n // acc.num_processes, (acc.process_index + 1) * n // acc.num_processes)
    batch, adv = saved["batch"].select_rows(mine), saved["advantages"][mine]

    def step():
        train_on_batch(model, optimizer, scheduler, acc, batch, adv, algo=config.algorithm, optim=config.optim,
                       pad_id=saved["pad_id"], temperature=config.rollout.temperature,
                       norm_constant=config.algorithm.loss_norm_constant or config.rollout.max_new_tokens)
        scheduler.step()

    return acc, step


def worker(args) -> None:
    from reasonrl.malloc_tuning import tune_malloc

    tune_malloc()  # as the trainer's entry point does
    torch.set_num_threads(args.threads)
    label, overrides, _ = CONFIGS[args.worker]
    saved = load_batch(Path(args.out) / "batch.pt")
    setup = plain_setup if args.worker == "plain" else trainer_setup
    acc, step = setup(args, recipe(args, overrides), saved)
    cuda = torch.cuda.is_available()
    times = []
    for k in range(args.steps + 1):  # the first step is the warm-up
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - start)
    peaks = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0], dtype=torch.float64)
    if acc is not None:
        peaks = acc.reduce(peaks.to(acc.device), reduction="max").cpu()
    if acc is None or acc.is_main_process:
        tokens, mean = batch_tokens(saved["batch"]), sum(times) / len(times)
        result = {"label": label, "processes": acc.num_processes if acc else 1, "threads": args.threads,
                  "step_s": times, "mean_step_s": mean, "tokens_per_s": tokens / mean,
                  "loss_tokens_per_s": int(saved["batch"].trained_mask().sum()) / mean,
                  "peak_rss_mib": peaks[0].item(), **({"peak_cuda_mib": peaks[1].item()} if cuda else {})}
        print(json.dumps(result))


def run_config(args, name: str) -> dict:
    """One configuration in its own process (2 under accelerate launch for the ZeRO rows); its JSON result."""
    launch = CONFIGS[name][2]
    threads = 1 if launch else args.threads
    flags = ["--worker", name, "--out", args.out, "--threads", str(threads), "--steps", str(args.steps),
             "--prompts", str(args.prompts), "--samples", str(args.samples), "--max-new-tokens",
             str(args.max_new_tokens), "--seed", str(args.seed)]
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "--num_processes",
              "2"] if launch else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]  # other work on the machine skews the timings: recorded in the JSON
    done = subprocess.run([*prefix, __file__, *flags], check=False, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"label": CONFIGS[name][0], "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return {**json.loads(lines[-1]), "loadavg_1m": [load_before, os.getloadavg()[0]]}


def print_table(args, saved, results: dict) -> dict:
    batch = saved["batch"]
    plain = results.get("plain", {}).get("tokens_per_s")
    ratios = {name: r["tokens_per_s"] / plain for name, r in results.items() if plain and "tokens_per_s" in r}
    trained_rows = int((saved["advantages"] != 0).sum())
    print(f"\n{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens (hf engine, "
          f"seed {args.seed}); {batch_tokens(batch)} model-input tokens per step, "
          f"{int(batch.trained_mask().sum())} loss tokens; {trained_rows}/{batch.num_rows} rows with A != 0"
          f"{' (random advantages: every group had equal rewards)' if saved['random_advantages'] else ''}\n")
    print("| configuration | tokens/s | vs plain loop | mean step s | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {r['label']} | failed: {' '.join(r['error'])[:80]} | | | |")
            continue
        ratio = f"{ratios[name]:.0%}" if name in ratios else "-"
        print(f"| {r['label']} | {r['tokens_per_s']:.0f} | {ratio} | {r['mean_step_s']:.2f} | "
              f"{r['peak_rss_mib']:.0f} |")
    print(f"\n1 warm-up + {args.steps} timed steps each, own process per row; single-process rows use "
          f"{args.threads} torch threads, the 2-process rows 1 thread per process (peak RSS: max over ranks). "
          "tokens/s counts every row's prompt + completion tokens, whatever a configuration skips or shares.")
    if "padded" in ratios:
        print(f"trainer (padded) / plain loop: {ratios['padded']:.0%} (target >= 90%)")
    for bf16, fp32 in FP32_ROW.items():
        if "tokens_per_s" in results.get(bf16, {}) and "tokens_per_s" in results.get(fp32, {}):
            ratio = results[bf16]["tokens_per_s"] / results[fp32]["tokens_per_s"]
            ratios[f"{bf16}/{fp32}"] = ratio
            print(f"{results[bf16]['label']} / {results[fp32]['label']}: {ratio:.2f}x (target >= 2.5x with fast bf16)")
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single-process rows")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_train"), help="folder of the cached batch")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    saved = cached_batch(args)
    from reasonrl.precision import cpu_isa_flags, resolve_precision

    isa = {k: v for k, v in cpu_isa_flags().items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    print(f"CPU ISA (torch): {isa}; model.dtype=auto here: {resolve_precision('auto').describe()}", flush=True)
    results = {name: run_config(args, name) for name in names}
    ratios = print_table(args, saved, results)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "worker"}
        print(json.dumps({"config": settings, "tokens_per_step": batch_tokens(saved["batch"]),
                          "random_advantages": saved["random_advantages"], "results": results,
                          "ratio_to_plain": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
