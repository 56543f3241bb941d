"""Readable PyTorch reference of vertical-slash sparse attention (differentiable, any device).

Two forms with the same result:
- `masked_attention`: softmax(QK^T * scale + log M) V with the dense mask M of `pattern_mask`. Simple, O(N^2) memory.
  It takes global positions, so a ring rank can attend its queries to another rank's keys; it returns the
  log-sum-exp too, so partial results over disjoint key sets merge exactly (`merge_partials`).
- `blockwise_sparse_attention`: per query block, only the keys of active tiles and vertical columns are gathered,
  so memory and time follow the kept density. Used for long sequences on CPU.
"""

from __future__ import annotations

import torch

from reasonrl.kernels.pattern import SparsePattern, num_blocks, pattern_mask, repeat_kv


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half precisions, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def masked_attention(q, k, v, mask, scale: float):
    """q [B, H, n, D], k/v [B, Hk, m, D], mask bool [B, H, n, m] -> (out [B, H, n, D], lse [B, H, n]), both in
    float32 (float64 for float64 inputs).

    Rows without any kept key give out = 0 and lse = -inf.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    dtype = compute_dtype(q)
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.matmul(probs, v.to(dtype))
    return out, lse


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial (out, lse) pairs."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    weight_a = torch.exp(lse_a - safe).nan_to_num(0.0)
    weight_b = torch.exp(lse_b - safe).nan_to_num(0.0)
    return out_a * weight_a[..., None] + out_b * weight_b[..., None], lse


def reference_sparse_attention(q, k, v, pattern: SparsePattern, scale: float | None = None, q_pos=None, k_pos=None,
                               return_lse: bool = False):
    """Sparse causal attention of q against k/v under `pattern` (dense-mask form). Output in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = masked_attention(q, k, v, pattern_mask(pattern, q_pos, k_pos), scale)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def kept_keys(pattern: SparsePattern, query_block: int, seq_len: int) -> torch.Tensor:
    """bool [B, H, end] over keys before the end of `query_block`: in an active tile or a vertical column."""
    g = pattern.block_size
    end = min((query_block + 1) * g, seq_len)
    key_blocks = torch.arange(end, device=pattern.vertical.device) // g
    tiles = pattern.slash_blocks[..., query_block - key_blocks]
    return tiles | pattern.vertical[..., :end]


def blockwise_sparse_attention(q, k, v, pattern: SparsePattern, scale: float | None = None):
    """Same result as `reference_sparse_attention` (whole sequence), computing only the kept keys of each query
    block. The key set is the union over the (B, H) rows, so it is exact, and cheap when heads agree."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n, g = q.shape[2], pattern.block_size
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    outputs = []
    for block in range(num_blocks(n, g)):
        start, end = block * g, min((block + 1) * g, n)
        kept = kept_keys(pattern, block, n)
        columns = kept.any(dim=0).any(dim=0).nonzero().squeeze(-1)
        q_pos = torch.arange(start, end, device=q.device)
        dtype = compute_dtype(q)
        logits = torch.matmul(q[:, :, start:end].to(dtype), k[:, :, columns].to(dtype).transpose(-1, -2)) * scale
        allowed = kept[..., columns][:, :, None, :] & (columns[None, :] <= q_pos[:, None])
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        outputs.append(torch.matmul(probs, v[:, :, columns].to(dtype)))
    return torch.cat(outputs, dim=2).to(q.dtype)
