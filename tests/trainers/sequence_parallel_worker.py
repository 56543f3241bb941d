"""Optimizer steps of the real training path (`train_on_batch`) with sparse attention, either in one process (packed
rows: each sequence is one row, so sparse attention sees whole sequences) or with every sequence split across the 2
ranks of a sequence-parallel group (striped blocks, sparse ring attention); the test compares the two.

Usage: sequence_parallel_worker.py MODEL_DIR OUT.pt SEQUENCE_PARALLEL [RING]
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from sharding_worker import GROUP, PAD, ROWS, WIDTH, algorithm, step_inputs

from reasonrl.config import OptimConfig, SparseAttentionSettings
from reasonrl.models import load_model
from reasonrl.trainers.distributed import build_accelerator
from reasonrl.trainers.optimization import build_optimizer, build_scheduler
from reasonrl.trainers.sequence_parallel import DataParallelView, build_sequence_parallel
from reasonrl.trainers.step import train_on_batch

STEPS = 2


def settings(sequence_parallel: int, ring: str) -> SparseAttentionSettings:
    # tiles of 4 tokens; 2 columns and 2 diagonals kept besides the sink and the local diagonal: really sparse
    return SparseAttentionSettings(dense_below=0, block_size=4, last_q=4, vertical_size=2, slash_size=2, sink=1,
                                   local_window=1, sequence_parallel=sequence_parallel, ring=ring, local_world_size=1)


def run(model_dir: str, sequence_parallel: int, ring: str = "stripe") -> tuple[object, dict]:
    acc = build_accelerator(120.0)
    sparse = settings(sequence_parallel, ring)
    sp = build_sequence_parallel(acc.num_processes, acc.process_index, sparse)
    optim = OptimConfig(lr=3e-3, micro_batch_size=1, max_grad_norm=0.5, packing=sp is None)
    model = load_model(model_dir, dtype="float32", attn_implementation="reasonrl_sparse",
                       sparse_attention=dataclasses.asdict(sparse))
    optimizer = build_optimizer(model, optim)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, optim, total_steps=STEPS, sequences_per_step=ROWS)
    data = acc if sp is None else DataParallelView(acc, sp)
    per_rank = ROWS // data.num_processes
    mine = torch.arange(data.process_index * per_rank, (data.process_index + 1) * per_rank)
    losses, grad_norms, entropies = [], [], []
    for step in range(STEPS):
        batch, advantages = step_inputs(step)
        metrics = train_on_batch(model, optimizer, scheduler, data, batch.select_rows(mine), advantages[mine],
                                 algo=algorithm(), optim=optim, pad_id=PAD, temperature=1.0, norm_constant=WIDTH)
        scheduler.step()
        losses.append(metrics["loss/policy"])
        grad_norms.append(metrics["optim/grad_norm"])
        entropies.append(metrics["policy/entropy"])
    params = {name: p.detach().clone() for name, p in acc.unwrap_model(model).named_parameters()}
    return acc, {"losses": losses, "grad_norms": grad_norms, "entropies": entropies, "params": params,
                 "group": GROUP, "num_processes": acc.num_processes}


if __name__ == "__main__":
    accelerator, out = run(sys.argv[1], int(sys.argv[3]), *sys.argv[4:])
    if accelerator.is_main_process:
        torch.save(out, sys.argv[2])
    accelerator.wait_for_everyone()
