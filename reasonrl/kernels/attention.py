"""Dynamic sparse attention entry point: estimate a vertical-slash pattern, then run the chosen implementation.

impl:
- "reference": the PyTorch reference (any device, differentiable): dense-mask form up to `blockwise_above` tokens,
  blockwise form (memory follows the kept density) beyond;
- "triton": the block-sparse Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests);
- "dense": ordinary causal SDPA (what sparse attention is compared against);
- "auto": triton on CUDA tensors, reference otherwise.
Sequences shorter than `dense_below` always run dense: the pattern would keep nearly everything there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from reasonrl.kernels.pattern import PatternConfig, SparsePattern, estimate_pattern, repeat_kv
from reasonrl.kernels.reference import blockwise_sparse_attention, reference_sparse_attention

IMPLEMENTATIONS = ("auto", "reference", "triton", "dense")


@dataclass(frozen=True)
class SparseAttentionConfig:
    impl: str = "auto"
    dense_below: int = 4096
    blockwise_above: int = 2048
    pattern: PatternConfig = field(default_factory=PatternConfig)

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"sparse attention impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")

    @classmethod
    def from_dict(cls, values: dict) -> SparseAttentionConfig:
        values = dict(values)
        pattern = values.pop("pattern", {})
        fields = set(cls.__dataclass_fields__) - {"pattern"}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown sparse attention keys {sorted(unknown)}; valid: {sorted(fields)}")
        return cls(pattern=PatternConfig(**pattern), **values)

    def to_dict(self) -> dict:
        return asdict(self)


def dense_causal_attention(q, k, v, scale: float | None = None):
    """Causal SDPA with grouped-query heads expanded. [B, H, N, D] -> [B, H, N, D]."""
    return F.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), is_causal=True,
                                          scale=scale)


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return impl


def attention_with_pattern(q, k, v, pattern: SparsePattern, impl: str, scale: float, blockwise_above: int):
    """Run one implementation on an already estimated pattern."""
    if impl == "triton":
        from reasonrl.kernels.layout import build_block_layout
        from reasonrl.kernels.triton_sparse import triton_sparse_attention

        return triton_sparse_attention(q, k, v, build_block_layout(pattern), scale=scale)
    if q.shape[2] > blockwise_above:
        return blockwise_sparse_attention(q, k, v, pattern, scale=scale)
    return reference_sparse_attention(q, k, v, pattern, scale=scale)


def sparse_attention(q, k, v, config: SparseAttentionConfig | None = None, scale: float | None = None):
    """Causal dynamic sparse attention of equal-length sequences. q [B, H, N, D], k/v [B, Hk, N, D] -> [B, H, N, D]."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"sparse attention needs as many queries as keys (no KV cache), got {q.shape[2]} and "
                         f"{k.shape[2]}")
    config = SparseAttentionConfig() if config is None else config
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_impl(config.impl, q.device)
    if impl == "dense" or q.shape[2] < config.dense_below:
        return dense_causal_attention(q, k, v, scale)
    pattern = estimate_pattern(q.detach(), k.detach(), config.pattern, scale)
    return attention_with_pattern(q, k, v, pattern, impl, scale, config.blockwise_above)


def segment_bounds(position_ids: torch.Tensor | None, valid: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)) of the sequences in one row: runs of valid tokens, split where position ids restart.

    valid: bool [N] (the 2-D padding mask's row); position_ids: [N] or None (one sequence per run).
    """
    n = valid.shape[0]
    starts = valid.clone()
    starts[1:] &= ~valid[:-1]
    if position_ids is not None:
        restart = torch.ones(n, dtype=torch.bool, device=valid.device)
        restart[1:] = position_ids[1:] != position_ids[:-1] + 1
        starts |= valid & restart
    ends = valid.clone()
    ends[:-1] &= starts[1:] | ~valid[1:]
    first = starts.nonzero().squeeze(-1).tolist()
    last = ends.nonzero().squeeze(-1).tolist()
    return [(s, e + 1) for s, e in zip(first, last, strict=True)]


def varlen_sparse_attention(q, k, v, config: SparseAttentionConfig, scale: float | None = None,
                            padding_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
    """Variable-length batches: padded rows (padding_mask [B, N], 1 = token) and/or packed rows (position ids
    restarting at 0). Each sequence gets its own pattern (dense below `dense_below`); padded positions give 0."""
    b, _, n, _ = q.shape
    if padding_mask is None and position_ids is None:
        return sparse_attention(q, k, v, config, scale)
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if padding_mask is None else padding_mask.bool()
    rows = []
    for row in range(b):
        row_positions = None if position_ids is None else position_ids[min(row, position_ids.shape[0] - 1)]
        pieces, cursor = [], 0
        for start, end in segment_bounds(row_positions, valid[row]):
            if start > cursor:
                pieces.append(_zeros_like_rows(q, v, start - cursor))
            pieces.append(sparse_attention(q[row : row + 1, :, start:end], k[row : row + 1, :, start:end],
                                           v[row : row + 1, :, start:end], config, scale))
            cursor = end
        if cursor < n:
            pieces.append(_zeros_like_rows(q, v, n - cursor))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _zeros_like_rows(q, v, length: int):
    return q.new_zeros(1, q.shape[1], length, v.shape[-1])
