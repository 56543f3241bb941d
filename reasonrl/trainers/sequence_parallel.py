"""Sequence parallelism: the W ranks of a group split every training sequence and attend with the sparse ring.

`model.sparse_attention.sequence_parallel = W` (with `model.attn_implementation = reasonrl_sparse`) makes groups of W
consecutive ranks. Within a group every rank holds the *same* rollout batch (the group leader's, broadcast), and each
training forward runs one sequence cut into blocks of G tokens, block b on group rank b mod W (the striped layout of
`reasonrl.kernels.ring`): each rank embeds, projects and runs the MLPs of its own blocks only, and the attention layers
exchange keys and values around the ring. The per-token log-probs are gathered back, so every rank of the group
computes the same loss; each rank's parameter gradient covers its own tokens, and the data-parallel gradient
average over all ranks adds them up (see `gather_striped`).

Everything that treats ranks as holders of *different* data (prompt sharding, seeds, advantages, metrics) sees the
groups through `DataParallelView`: rank = group index, world = number of groups, and sums count each group once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from reasonrl.kernels.context import RingContext, ring_forward
from reasonrl.kernels.ring import stripe, striped_positions, unstripe
from reasonrl.rl.losses import LOGPROB_CHUNK_ROWS
from reasonrl.trainers.policy import logprobs_and_entropy


@dataclass
class SequenceParallel:
    size: int  # W: ranks per sequence
    rank: int  # this rank within its group
    group: Any  # torch.distributed process group of the W ranks
    leader: int  # global rank of the group's rank 0
    dp_rank: int  # index of the group
    dp_size: int  # number of groups
    block_size: int  # G: striping granularity (= the sparse pattern's tile size)
    hierarchical: bool = False
    local_world_size: int | None = None


def build_sequence_parallel(num_processes: int, process_index: int, settings) -> SequenceParallel | None:
    """Groups of `settings.sequence_parallel` consecutive ranks (every rank creates every group, as torch requires)."""
    size = settings.sequence_parallel
    if size <= 1:
        return None
    if num_processes % size:
        raise ValueError(f"model.sparse_attention.sequence_parallel={size} must divide the number of processes "
                         f"({num_processes})")
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, num_processes, size)]
    return SequenceParallel(
        size=size, rank=process_index % size, group=groups[process_index // size],
        leader=process_index - process_index % size, dp_rank=process_index // size, dp_size=num_processes // size,
        block_size=settings.block_size, hierarchical=settings.ring == "hierarchical",
        local_world_size=settings.local_world_size,
    )


class DataParallelView:
    """The Accelerator as the data sees it under sequence parallelism: one rank per group.

    process_index / num_processes are the group's index and count; `gather` keeps one copy per group; a `sum`
    reduction counts each group once (min / max are unaffected by identical copies). `world_size` is the real process
    count (the gradient average runs over every rank). Everything else is the Accelerator's."""

    def __init__(self, acc, sp: SequenceParallel):
        self._acc, self.sequence_parallel = acc, sp

    def __getattr__(self, name):
        return getattr(self._acc, name)

    @property
    def num_processes(self) -> int:
        return self.sequence_parallel.dp_size

    @property
    def process_index(self) -> int:
        return self.sequence_parallel.dp_rank

    @property
    def world_size(self) -> int:
        return self._acc.num_processes

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        every = self._acc.gather(tensor)
        if tensor.dim() == 0:
            return every[:: self.sequence_parallel.size]
        per_rank = every.reshape(self._acc.num_processes, -1, *every.shape[1:])
        return per_rank[:: self.sequence_parallel.size].reshape(-1, *every.shape[1:])

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum"):
        if reduction == "sum" and self.sequence_parallel.rank != 0:
            tensor = torch.zeros_like(tensor)
        return self._acc.reduce(tensor, reduction=reduction)


def sequence_parallel_of(acc) -> SequenceParallel | None:
    return acc.sequence_parallel if isinstance(acc, DataParallelView) else None


def gradient_world_size(acc) -> int:
    """Ranks the data-parallel gradient average runs over (all of them, also under sequence parallelism)."""
    return acc.world_size if isinstance(acc, DataParallelView) else acc.num_processes


def broadcast_from_leader(obj, sp: SequenceParallel):
    """The group leader's `obj` on every rank of the group (pickled; the other ranks' argument is ignored)."""
    box = [obj]
    dist.broadcast_object_list(box, src=sp.leader, group=sp.group)
    return box[0]


class _GatherStriped(torch.autograd.Function):
    """Forward: every rank's striped share -> the full tensor (on every rank). Backward: the share of the gradient.

    Exact when every rank of the group computes the same function of the gathered tensor (the trainer's loss is),
    so the gradient w.r.t. the full tensor is the same everywhere and each rank passes on its own positions."""

    @staticmethod
    def forward(ctx, local, sp: SequenceParallel, dim: int):
        shares = [torch.empty_like(local) for _ in range(sp.size)]
        dist.all_gather(shares, local.contiguous(), group=sp.group)
        ctx.sp, ctx.dim = sp, dim
        return unstripe(shares, dim, sp.block_size)

    @staticmethod
    def backward(ctx, grad):
        return stripe(grad, ctx.dim, ctx.sp.block_size, ctx.sp.rank, ctx.sp.size), None, None


def gather_striped(local: torch.Tensor, sp: SequenceParallel, dim: int = -1) -> torch.Tensor:
    return _GatherStriped.apply(local, sp, dim % local.dim())


def padded_length(length: int, sp: SequenceParallel) -> int:
    unit = sp.size * sp.block_size
    return math.ceil(length / unit) * unit


def sequence_parallel_completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                                          completion_mask: torch.Tensor, *, pad_id: int, sp: SequenceParallel,
                                          temperature: float = 1.0, chunk_size: int = LOGPROB_CHUNK_ROWS):
    """`completion_logprobs` of ONE row (micro-batches of 1 sequence) split across the group: [1, T] log-probs and
    entropies, the same on every rank of the group, differentiable through every rank's share.

    The model input is prompt + completion without its last token (nothing we score follows it), padded at the end to
    a multiple of W * G; positions are 0..L-1 (no padding inside, so no attention mask: causal attention never lets
    a real token see the end padding)."""
    if completion_ids.shape[0] != 1:
        raise ValueError("sequence parallelism runs one sequence per micro-batch (optim.micro_batch_size=1)")
    device = completion_ids.device
    prompt = torch.tensor(prompt_ids[0], dtype=torch.long, device=device)
    real = int(completion_mask[0].sum())
    completion = completion_ids[0, : max(real, 1)].clone()
    if real == 0:  # an empty row still runs (collectives stay in step); its values are zeros
        completion[0] = pad_id
    full = torch.cat([prompt, completion])
    length = full.numel() - 1
    padded = padded_length(length, sp)
    inputs = torch.full((padded,), pad_id, dtype=torch.long, device=device)
    inputs[:length] = full[:-1]
    targets = torch.full((padded,), pad_id, dtype=torch.long, device=device)
    targets[:length] = full[1:]
    mine = striped_positions(padded, sp.block_size, sp.rank, sp.size, device)
    context = RingContext(sp.group, length, sp.hierarchical, sp.local_world_size)
    with ring_forward(context):
        logits = model(input_ids=inputs[mine][None], position_ids=mine[None], use_cache=False).logits
    logp, entropy = logprobs_and_entropy(logits, targets[mine][None], temperature=temperature,
                                               chunk_size=chunk_size)
    both = gather_striped(torch.stack([logp[0], entropy[0]]), sp, dim=-1)  # [2, padded]
    scored = both[:, prompt.numel() - 1 : prompt.numel() - 1 + completion.numel()]
    width = completion_ids.shape[1]
    out = torch.zeros(2, width, dtype=scored.dtype, device=device)
    if real == 0:
        out = out + 0.0 * scored.sum()  # connected to the graph, so backward reaches every rank's share
    else:
        out = torch.cat([scored[:, :real], out[:, real:]], dim=1)
    return out[0][None], out[1][None]
