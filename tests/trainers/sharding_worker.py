"""Several optimizer steps of the real training path on fixed rollout batches, under whatever layout it is launched
with (one process, DDP, DeepSpeed ZeRO-2/3, two machines); the equivalence test compares the results.

Each step's global batch and advantages depend on the step only; every rank takes its share of the rows, as the
trainer does. It also saves the layout-free optimizer state, and can start from a model folder and optimizer state
written by another layout (as a resumed run does).
Usage: sharding_worker.py MODEL_DIR OUT.pt STEPS [FIRST_STEP OPTIMIZER_STATE.pt [MASTERS.pt]]
SHARDING_DTYPE=bfloat16 trains in mixed precision (bf16 autocast; under DeepSpeed its bf16 mode), as the trainer does
for model.dtype=bfloat16; MASTERS.pt holds float32 master weights to resume from (by trainable index).
"""

from __future__ import annotations

import os
import sys

import torch

from reasonrl.batch import RolloutBatch
from reasonrl.config import AlgorithmConfig, ModelConfig, OptimConfig
from reasonrl.models import load_policy
from reasonrl.trainers.distributed import (
    build_accelerator,
    configure_deepspeed,
    full_named_parameters,
    load_master_weights,
    load_portable_optimizer_state,
    master_weights,
    portable_optimizer_state,
    zero_stage,
)
from reasonrl.trainers.optimization import build_optimizer, build_scheduler
from reasonrl.trainers.step import train_on_batch

PAD, ROWS, WIDTH, GROUP, VOCAB_LOW, VOCAB_HIGH = 0, 8, 7, 4, 3, 30
BUCKET_BYTES = 1 << 14  # gather buckets of 16 KiB: the tiny model (about 90 KiB) takes several


def step_inputs(step: int) -> tuple[RolloutBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    prompts = [torch.randint(VOCAB_LOW, VOCAB_HIGH, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 9, (ROWS // GROUP,), generator=g)]
    lengths = torch.randint(1, WIDTH + 1, (ROWS,), generator=g)
    mask = torch.arange(WIDTH)[None] < lengths[:, None]
    ids = torch.randint(VOCAB_LOW, VOCAB_HIGH, (ROWS, WIDTH), generator=g).masked_fill(~mask, PAD)
    batch = RolloutBatch(prompt_ids=[p for p in prompts for _ in range(GROUP)], completion_ids=ids,
                         completion_mask=mask, rollout_logprobs=None, finish_reasons=["stop"] * ROWS, group_size=GROUP)
    return batch, torch.randn(ROWS, generator=g)


def algorithm() -> AlgorithmConfig:
    return AlgorithmConfig(num_iterations=2, loss_agg="token_mean")  # two optimizer steps per batch, PPO ratio


def run(model_dir: str, steps: int, first_step: int = 0, optimizer_state: str | None = None,
        masters: str | None = None) -> tuple[object, dict]:
    acc = build_accelerator(120.0)
    zero = zero_stage(acc)
    optim = OptimConfig(lr=3e-3, micro_batch_size=1, max_grad_norm=0.5)  # clipping active: norms are > 0.5
    dtype = os.environ.get("SHARDING_DTYPE", "float32")
    model = load_policy(model_dir, ModelConfig(), compute_dtype=dtype)  # under ZeRO-3 it loads already sharded
    optimizer = build_optimizer(model, optim)
    if zero is not None:
        configure_deepspeed(acc, max_grad_norm=optim.max_grad_norm, bf16=dtype == "bfloat16")
    if zero == 3:  # release every parameter after use (by default DeepSpeed keeps small ones, i.e. all of this model)
        acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, optim, total_steps=steps, sequences_per_step=ROWS)
    core = acc.unwrap_model(model)
    trainable = [p for p in core.parameters() if p.requires_grad]
    if optimizer_state not in (None, "none"):
        load_portable_optimizer_state(optimizer, trainable, zero, torch.load(optimizer_state, weights_only=False))
    if masters:
        load_master_weights(trainable, zero, torch.load(masters, weights_only=False))
    per_rank = ROWS // acc.num_processes
    mine = torch.arange(acc.process_index * per_rank, (acc.process_index + 1) * per_rank)
    losses, grad_norms = [], []
    for step in range(first_step, steps):
        batch, advantages = step_inputs(step)
        local = batch.select_rows(mine)
        metrics = train_on_batch(model, optimizer, scheduler, acc, local, advantages[mine], algo=algorithm(),
                                 optim=optim, pad_id=PAD, temperature=1.0, norm_constant=WIDTH)
        scheduler.step()
        losses.append(metrics["loss/policy"])
        grad_norms.append(metrics["optim/grad_norm"])
    params, most_materialized = {}, 0
    for name, t in full_named_parameters(core, zero, bucket_bytes=BUCKET_BYTES):
        params[name] = t.detach().clone().cpu()
        most_materialized = max(most_materialized, sum(p.data.numel() * p.element_size() for p in core.parameters()))
    result = {"losses": losses, "grad_norms": grad_norms, "params": params, "num_processes": acc.num_processes,
              "zero_stage": zero, "optimizer": portable_optimizer_state(optimizer, trainable, zero),
              "masters": master_weights(trainable, zero), "param_dtype": str(trainable[0].dtype),
              "most_materialized_bytes": most_materialized,
              "model_bytes": sum(v.numel() * v.element_size() for v in params.values())}
    return acc, result


if __name__ == "__main__":
    accelerator, out = run(sys.argv[1], int(sys.argv[3]), *([int(sys.argv[4]), *sys.argv[5:7]] if len(sys.argv) > 4 else []))
    if accelerator.is_main_process:
        torch.save(out, sys.argv[2])
    accelerator.wait_for_everyone()
