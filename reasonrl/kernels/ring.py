"""Balanced sparse ring attention (MTraining "stripe" and "dr_stripe"): context parallelism over the W ranks of a
process group for vertical-slash sparse attention.

**Striped layout.** The sequence is cut into blocks of G = `block_size` tokens; global block b (tokens [bG, (b+1)G))
lives on rank b mod W, in order. Under a causal (and, mostly, a slash) pattern the work of a query block grows with
its position, so striping gives every rank the same mix of early and late blocks, whereas contiguous chunks would give
the last rank W times the work of the first. N must be a multiple of W * G (pad the end of the sequence: causal
attention never lets earlier tokens see the padding).

**Pattern.** Every rank needs the same global `SparsePattern`. `estimate_pattern_distributed` computes the pattern
that `estimate_pattern` gives on the full tensors: the last `last_q` queries are gathered, each rank scores its own
keys with the global row log-sum-exp, the score buffers are summed over ranks and every rank selects on identical
tensors.

**Ring.** Rank r keeps its queries and passes its K/V chunk around: at step s it holds the chunk of rank (r - s) mod W,
computes the attention of its queries to those keys under the pattern (global positions make the mask exact), and
merges the partial result by log-sum-exp. The next chunk's transfer runs while the current one is computed. In the
backward pass the probabilities are recomputed from the saved global log-sum-exp; the gradients of the keys and
values travel with their chunk and reach the owner after one extra hop.

**Hierarchical ring ("dr_stripe").** The W = M * L ranks form M nodes of L consecutive ranks. The outer ring (same
local rank on every node) moves a chunk once per outer step, overlapped with the inner ring (the ranks of one node),
which circulates that chunk through the node. The flat ring is the case M = 1 (one node of W ranks), so both share one
code path; they visit the same (query, key chunk) pairs, only the merge order differs.

Each step's tile uses the dense-mask reference (`masked_attention`): readable and exact; a block-sparse kernel can
replace `_attend_chunk` / `_chunk_grads` later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reasonrl.kernels.pattern import (
    PatternConfig,
    SparsePattern,
    last_query_logits,
    partial_scores,
    pattern_mask,
    repeat_kv,
    select_pattern,
)
from reasonrl.kernels.reference import masked_attention, merge_partials

# p2p tags: one per kind of message, so transfers in flight between the same two ranks never get matched wrongly
_INNER_KV, _INNER_GRAD, _OUTER_KV, _OUTER_GRAD = 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------------------------
# striped layout (pure)


def check_striped_length(seq_len: int, block_size: int, world: int) -> None:
    """Raise a ValueError unless `seq_len` splits into whole blocks, W per round (every rank gets as many)."""
    if block_size < 1 or world < 1:
        raise ValueError(f"block_size and world must be >= 1, got {block_size} and {world}")
    if seq_len % (world * block_size):
        raise ValueError(
            f"striped ring attention needs the sequence length ({seq_len}) to be a multiple of world * block_size "
            f"({world} * {block_size} = {world * block_size}); pad the sequence at the end to a multiple of "
            f"{world * block_size} tokens (causal attention keeps the padding invisible to the real tokens)"
        )


def striped_positions(seq_len: int, block_size: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Global token positions held by `rank`, in local order: blocks rank, rank + W, rank + 2W, ... of G tokens."""
    check_striped_length(seq_len, block_size, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    blocks = torch.arange(rank, seq_len // block_size, world, device=device)
    return (blocks[:, None] * block_size + torch.arange(block_size, device=device)).reshape(-1)


def stripe(x: torch.Tensor, dim: int, block_size: int, rank: int, world: int) -> torch.Tensor:
    """The share of `rank` of the full tensor `x` along the sequence dimension `dim` (differentiable)."""
    dim = dim % x.ndim
    return x.index_select(dim, striped_positions(x.shape[dim], block_size, rank, world, x.device))


def unstripe(shares: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int, block_size: int) -> torch.Tensor:
    """Inverse of `stripe`: the full tensor from the shares of ranks 0..W-1 (in rank order).

    Local block j of rank r is global block j * W + r, so stacking the shares behind the local block index and
    flattening (local block, rank, token) gives the global order.
    """
    world = len(shares)
    dim = dim % shares[0].ndim
    local = shares[0].shape[dim]
    if local % block_size or any(s.shape != shares[0].shape for s in shares):
        raise ValueError(f"unstripe needs {world} shares of the same shape, whole blocks of {block_size} along dim "
                         f"{dim}; got {[tuple(s.shape) for s in shares]}")
    blocks = [s.unflatten(dim, (local // block_size, block_size)) for s in shares]
    return torch.stack(blocks, dim=dim + 1).flatten(dim, dim + 2)


# ---------------------------------------------------------------------------------------------------------------
# process-group helpers


def _group_rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class _Ring:
    """A ring of group ranks (`members`, in ring order) seen from member `index`: it sends to the next member and
    receives from the previous one."""

    members: tuple[int, ...]
    index: int
    group: object

    @property
    def size(self) -> int:
        return len(self.members)

    def exchange(self, tensor: torch.Tensor, tag: int) -> _Transfer:
        """Start sending `tensor` to the next member and receiving the previous member's tensor of the same shape
        (returned by `.wait()`). A ring of one member hands the tensor back unchanged."""
        if self.size == 1:
            return _Transfer(tensor, [])
        received = torch.empty_like(tensor)
        send_to = self.members[(self.index + 1) % self.size]
        receive_from = self.members[(self.index - 1) % self.size]
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), group=self.group, tag=tag, group_peer=send_to),
               dist.P2POp(dist.irecv, received, group=self.group, tag=tag, group_peer=receive_from)]
        return _Transfer(received, dist.batch_isend_irecv(ops))


@dataclass
class _Transfer:
    """A transfer in flight; `wait()` finishes both the send and the receive and returns the received tensor."""

    received: torch.Tensor
    works: list

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


@dataclass(frozen=True)
class _Topology:
    """Outer ring (nodes) x inner ring (ranks of one node). Node m holds group ranks [m * L, (m + 1) * L)."""

    outer: _Ring
    inner: _Ring

    def source(self, outer_step: int, inner_step: int) -> int:
        """Group rank whose K/V chunk this rank holds at (outer step t, inner step i): node - t, local rank - i."""
        node = (self.outer.index - outer_step) % self.outer.size
        local = (self.inner.index - inner_step) % self.inner.size
        return node * self.inner.size + local


def _topology(group, hierarchical: bool, local_world_size: int | None) -> _Topology:
    rank, world = _group_rank_world(group)
    if not hierarchical:
        local_world_size = world  # one node: the flat ring
    elif local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local_world_size < 1 or world % local_world_size:
        raise ValueError(f"local_world_size ({local_world_size}) must divide the group size ({world})")
    nodes, node, local = world // local_world_size, rank // local_world_size, rank % local_world_size
    inner = _Ring(tuple(node * local_world_size + i for i in range(local_world_size)), local, group)
    outer = _Ring(tuple(m * local_world_size + local for m in range(nodes)), node, group)
    return _Topology(outer, inner)


# ---------------------------------------------------------------------------------------------------------------
# distributed pattern estimation


@torch.no_grad()
def _gather_last_queries(q_local, q_pos, end: int, last: int, group) -> torch.Tensor:
    """float32 [B, H, last, D]: the queries at global positions [end - last, end), from whichever ranks hold
    them. Each rank writes its rows into a zero buffer and the buffers are summed (x + 0 is exact)."""
    b, h, _, d = q_local.shape
    buffer = torch.zeros(b, h, last, d, dtype=torch.float32, device=q_local.device)
    mine = (q_pos >= end - last) & (q_pos < end)
    buffer[:, :, q_pos[mine] - (end - last)] = q_local[:, :, mine].float()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


@torch.no_grad()
def _global_row_lse(logits: torch.Tensor, group) -> torch.Tensor:
    """log sum_j exp(logit_ij) over the keys of every rank: max over ranks, then the sum of exp(logit - max)."""
    row_max = logits.amax(dim=-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    finite_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    sums = torch.exp(logits - finite_max[..., None]).sum(dim=-1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return finite_max + torch.log(sums)


@torch.no_grad()
def estimate_pattern_distributed(q_local, k_local, config: PatternConfig, group=None, scale: float | None = None,
                                 valid_len: int | None = None) -> SparsePattern:
    """The pattern `estimate_pattern(full_q, full_k, config)` gives, from striped shares (layout block size =
    `config.block_size`). Every rank returns the same pattern (the selection runs on all-reduced, hence identical,
    scores); it equals the single-process one up to ties broken differently by ulp-level score differences.

    valid_len: the real tokens when the end of the sequence is padding (to a multiple of W * G): the scoring queries
    are then the last `last_q` real ones (padding keys get no score: no real query sees them)."""
    rank, world = _group_rank_world(group)
    g = config.block_size
    seq_len = q_local.shape[2] * world
    valid_len = seq_len if valid_len is None else valid_len
    if not 0 < valid_len <= seq_len:
        raise ValueError(f"valid_len={valid_len} must be in [1, {seq_len}]")
    scale = q_local.shape[-1] ** -0.5 if scale is None else scale
    q_pos = striped_positions(seq_len, g, rank, world, q_local.device)
    k_pos = q_pos
    last = min(config.last_q, valid_len)
    q_last = _gather_last_queries(q_local, q_pos, valid_len, last, group)
    last_pos = torch.arange(valid_len - last, valid_len, device=q_local.device)
    logits = last_query_logits(q_last, k_local, last_pos, k_pos, scale)
    row_lse = _global_row_lse(logits, group) if config.normalize == "softmax" else None
    vertical, slash = partial_scores(logits, last_pos, k_pos, seq_len, config.normalize, row_lse=row_lse)
    scores = torch.cat([vertical, slash], dim=-1)  # one all-reduce for both
    dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=group)
    return select_pattern(scores[..., :seq_len], scores[..., seq_len:], config)


def patterns_agree(pattern: SparsePattern, group=None) -> bool:
    """True when every rank of `group` holds this exact pattern (a debugging check: one all-reduce)."""
    flat = torch.cat([pattern.vertical.reshape(-1), pattern.slash_blocks.reshape(-1)]).to(torch.int32)
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


# ---------------------------------------------------------------------------------------------------------------
# per-step tile: attention of the local queries to one K/V chunk, and its gradients


def _attend_chunk(q, kv, pattern, q_pos, k_pos, scale):
    """(out, lse) float32 of the local queries against one chunk (kv = stack of k and v)."""
    return masked_attention(q, kv[0], kv[1], pattern_mask(pattern, q_pos, k_pos), scale)


def _chunk_grads(q, kv, d_out, lse, delta, pattern, q_pos, k_pos, scale):
    """Gradient contributions of one chunk: (dq [B, H, n, D], dkv [2, B, Hk, m, D]), float32.

    With P = exp(S - lse) the final probabilities (lse over *all* keys, so P of this chunk is exact without the
    others), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta) where delta = rowsum(dO * O), dQ = dS K * scale and
    dK = dS^T Q * scale. Query heads of one GQA group add into their shared key/value head.
    """
    heads, kv_heads = q.shape[1], kv.shape[2]
    k, v = repeat_kv(kv[0], heads).float(), repeat_kv(kv[1], heads).float()
    qf = q.float()
    logits = torch.matmul(qf, k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~pattern_mask(pattern, q_pos, k_pos), float("-inf"))
    probs = torch.exp(logits - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    d_v = torch.matmul(probs.transpose(-1, -2), d_out)
    d_probs = torch.matmul(d_out, v.transpose(-1, -2))
    d_logits = probs * (d_probs - delta[..., None]) * scale
    d_q = torch.matmul(d_logits, k)
    d_k = torch.matmul(d_logits.transpose(-1, -2), qf)
    b, _, m, d = d_k.shape
    group_sum = lambda x: x.view(b, kv_heads, heads // kv_heads, m, d).sum(dim=2)
    return d_q, torch.stack([group_sum(d_k), group_sum(d_v)])


# ---------------------------------------------------------------------------------------------------------------
# ring schedules


def _ring_forward(q, kv, pattern, topo: _Topology, scale):
    """Visit every chunk once: outer steps move a node's chunk to the next node (prefetched), inner steps circulate
    it through the node. Returns (out, lse) float32 over all keys."""
    seq_len, g = pattern.seq_len, pattern.block_size
    world = topo.outer.size * topo.inner.size
    q_pos = striped_positions(seq_len, g, topo.source(0, 0), world, q.device)
    out = lse = None
    outer_kv = kv
    for t in range(topo.outer.size):
        next_outer = topo.outer.exchange(outer_kv, _OUTER_KV) if t + 1 < topo.outer.size else None
        chunk = outer_kv
        for i in range(topo.inner.size):
            next_chunk = topo.inner.exchange(chunk, _INNER_KV) if i + 1 < topo.inner.size else None
            k_pos = striped_positions(seq_len, g, topo.source(t, i), world, q.device)
            part_out, part_lse = _attend_chunk(q, chunk, pattern, q_pos, k_pos, scale)
            out, lse = (part_out, part_lse) if out is None else merge_partials(out, lse, part_out, part_lse)
            if next_chunk is not None:
                chunk = next_chunk.wait()
        if next_outer is not None:
            outer_kv = next_outer.wait()
    return out, lse


def _inner_backward(q, d_out, lse, delta, chunk, pattern, q_pos, topo: _Topology, outer_step, d_q, scale):
    """One pass of `chunk` (this rank's outer chunk at `outer_step`) around the inner ring. Adds the query gradients
    into `d_q`; returns the node's summed dkv for the chunk this rank started with.

    The dkv of a chunk travels with it: each step adds its contribution to the sum received from the previous rank
    (the receive overlaps the step's compute) and passes it on; after the last step one more hop brings every sum
    to the rank that started the chunk's tour."""
    seq_len, g = pattern.seq_len, pattern.block_size
    world = topo.outer.size * topo.inner.size
    travelling = None
    for i in range(topo.inner.size):
        next_chunk = topo.inner.exchange(chunk, _INNER_KV) if i + 1 < topo.inner.size else None
        k_pos = striped_positions(seq_len, g, topo.source(outer_step, i), world, q.device)
        step_dq, d_kv = _chunk_grads(q, chunk, d_out, lse, delta, pattern, q_pos, k_pos, scale)
        d_q += step_dq
        if travelling is not None:
            d_kv = travelling.wait() + d_kv
        travelling = topo.inner.exchange(d_kv, _INNER_GRAD)  # the last one is the hop back to the chunk's starter
        if next_chunk is not None:
            chunk = next_chunk.wait()
    return travelling.wait()


def _ring_backward(q, kv, d_out, out, lse, pattern, topo: _Topology, scale):
    """(dq, dkv) float32 of this rank's queries and of its own K/V chunk. The outer ring works like the inner one:
    node sums of dkv follow their chunk to the next node and one extra outer hop returns them to the owner."""
    seq_len, g = pattern.seq_len, pattern.block_size
    world = topo.outer.size * topo.inner.size
    q_pos = striped_positions(seq_len, g, topo.source(0, 0), world, q.device)
    d_out = d_out.float()
    delta = (d_out * out).sum(dim=-1)
    d_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    outer_kv, travelling = kv, None
    for t in range(topo.outer.size):
        next_outer = topo.outer.exchange(outer_kv, _OUTER_KV) if t + 1 < topo.outer.size else None
        d_kv = _inner_backward(q, d_out, lse, delta, outer_kv, pattern, q_pos, topo, t, d_q, scale)
        if travelling is not None:
            d_kv = travelling.wait() + d_kv
        travelling = topo.outer.exchange(d_kv, _OUTER_GRAD)  # the last one is the hop back to the owner
        if next_outer is not None:
            outer_kv = next_outer.wait()
    return d_q, travelling.wait()


class _RingSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, topo, scale):
        kv = torch.stack([k, v])  # one message per hop
        out, lse = _ring_forward(q, kv, pattern, topo, scale)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.pattern, ctx.topo, ctx.scale = pattern, topo, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, kv, out, lse = ctx.saved_tensors
        d_q, d_kv = _ring_backward(q, kv, d_out, out, lse, ctx.pattern, ctx.topo, ctx.scale)
        return d_q.to(q.dtype), d_kv[0].to(kv.dtype), d_kv[1].to(kv.dtype), None, None, None


def ring_sparse_attention(q_local, k_local, v_local, pattern: SparsePattern, group=None, scale: float | None = None,
                          hierarchical: bool = False, local_world_size: int | None = None) -> torch.Tensor:
    """Sparse causal attention of this rank's striped queries to the keys of every rank: out [B, H, n_local, D] in
    q's dtype, differentiable in q, k and v.

    q_local [B, H, n_local, D], k_local / v_local [B, Hk, n_local, D]: the `stripe` shares (block size =
    `pattern.block_size`) of the full tensors; `pattern` is the global pattern, the same on every rank.
    hierarchical: two-level ring, nodes of `local_world_size` consecutive group ranks (default: $LOCAL_WORLD_SIZE).
    Collective over `group`: every rank must call it (and its backward) with the same arguments.
    """
    _, world = _group_rank_world(group)
    n_local = q_local.shape[2]
    if n_local * world != pattern.seq_len or k_local.shape[2] != n_local or v_local.shape != k_local.shape:
        raise ValueError(f"each of the {world} ranks must hold {pattern.seq_len} / {world} tokens of q, k and v; "
                         f"got q {tuple(q_local.shape)}, k {tuple(k_local.shape)}, v {tuple(v_local.shape)}")
    check_striped_length(pattern.seq_len, pattern.block_size, world)
    topo = _topology(group, hierarchical, local_world_size)
    scale = q_local.shape[-1] ** -0.5 if scale is None else scale
    return _RingSparseAttention.apply(q_local, k_local, v_local, pattern, topo, scale)
