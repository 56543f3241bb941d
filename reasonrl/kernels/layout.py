"""From a pattern to the index lists a block-sparse kernel walks: active key tiles plus "bar" columns.

For query block a (rows [a*G, (a+1)*G)):
- `block_index[..., a, :block_count[..., a]]`: the active key blocks b <= a, ascending (the last is always b = a,
  the diagonal tile, which needs the element-wise causal mask; the others are entirely visible);
- `column_index[..., a, :column_count[..., a]]`: the vertical columns before a*G that no active tile holds, ascending.
  Every query of the block sees them (no mask needed), and no key is counted twice.
Entries beyond the counts are padding (0) and must not be read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reasonrl.kernels.pattern import SparsePattern


@dataclass
class BlockLayout:
    block_count: torch.Tensor  # int32 [B, H, nqb]
    block_index: torch.Tensor  # int32 [B, H, nqb, nqb]
    column_count: torch.Tensor  # int32 [B, H, nqb]
    column_index: torch.Tensor  # int32 [B, H, nqb, max_columns] (max_columns >= 1)
    block_size: int
    seq_len: int


def active_tiles(pattern: SparsePattern) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: tile (a, b) is computed (b <= a and the slash distance a - b is kept)."""
    nb = pattern.num_blocks
    blocks = torch.arange(nb, device=pattern.vertical.device)
    distance = blocks[:, None] - blocks[None, :]
    tiles = pattern.slash_blocks[..., distance.clamp(min=0)]
    return tiles & (distance >= 0)


def _compact(values: torch.Tensor, keep: torch.Tensor, fill: int):
    """Kept values first (ascending), then padding; returns (int32 values, int32 counts)."""
    ordered = torch.where(keep, values, torch.full_like(values, fill)).sort(dim=-1).values
    counts = keep.sum(dim=-1)
    ordered = torch.where(torch.arange(values.shape[-1], device=values.device) < counts[..., None], ordered, 0)
    return ordered.to(torch.int32), counts.to(torch.int32)


def build_block_layout(pattern: SparsePattern) -> BlockLayout:
    n, g, nb = pattern.seq_len, pattern.block_size, pattern.num_blocks
    device = pattern.vertical.device
    tiles = active_tiles(pattern)
    block_ids = torch.arange(nb, device=device).expand_as(tiles)
    block_index, block_count = _compact(block_ids, tiles, nb)

    # vertical columns per row, ascending, padded with the sentinel n
    columns = torch.arange(n, device=device).expand_as(pattern.vertical)
    width = max(int(pattern.vertical.sum(dim=-1).max()), 1)
    vertical = torch.where(pattern.vertical, columns, n).sort(dim=-1).values[..., :width]
    starts = torch.arange(nb, device=device)[:, None] * g
    candidates = vertical[:, :, None, :].expand(-1, -1, nb, -1)
    column_block = (candidates // g).clamp(max=nb - 1)
    in_tile = tiles.gather(-1, column_block)
    keep = (candidates < starts) & ~in_tile
    column_index, column_count = _compact(candidates, keep, n)
    return BlockLayout(block_count, block_index, column_count, column_index, g, n)


def layout_mask(layout: BlockLayout) -> torch.Tensor:
    """Dense bool [B, H, N, N] of what a kernel walking `layout` computes (tests compare it with `pattern_mask`)."""
    b, h, nb = layout.block_count.shape
    n, g = layout.seq_len, layout.block_size
    device = layout.block_count.device
    hits = torch.zeros(b, h, nb, n + 1, dtype=torch.int32, device=device)  # column n collects the padding
    slots = torch.arange(layout.block_index.shape[-1], device=device)
    valid = (slots < layout.block_count[..., None]).int()
    for offset in range(g):
        cols = (layout.block_index.long() * g + offset).clamp(max=n)
        hits.scatter_add_(-1, cols, valid)
    valid = (torch.arange(layout.column_index.shape[-1], device=device) < layout.column_count[..., None]).int()
    hits.scatter_add_(-1, layout.column_index.long(), valid)
    rows = (hits[..., :n] > 0).repeat_interleave(g, dim=2)[:, :, :n]
    return rows & torch.ones(n, n, dtype=torch.bool, device=device).tril()
