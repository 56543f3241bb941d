"""From a pattern to the index lists a block-sparse kernel walks: active key tiles plus "bar" columns.

For query block a (rows [a*G, (a+1)*G)):
- `block_index[..., a, :block_count[..., a]]`: the active key blocks b <= a, ascending (the last is always b = a,
  the diagonal tile, which needs the element-wise causal mask; the others are entirely visible);
- `column_index[..., a, :column_count[..., a]]`: the vertical columns before a*G that no active tile holds, ascending.
  Every query of the block sees them (no mask needed), and no key is counted twice.
Entries beyond the counts are padding (0) and must not be read; the index tensors are only as wide as the largest
count (at least 1).

A backward pass that accumulates key gradients per key block needs the same tiles listed by key block: for key
block c, the query blocks r whose tile (r, c) is active (`KeyMajorLayout`, from `BlockLayout.key_major()`, built
once per layout on its device and cached). Bar columns are not in it: they stay listed by query block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reasonrl.kernels.pattern import SparsePattern


@dataclass
class KeyMajorLayout:
    """The active tiles of a `BlockLayout` listed by key block: for key block c, `query_index[..., c,
    :query_count[..., c]]` are the query blocks r >= c whose tile (r, c) is active, ascending (the first is r = c when
    the diagonal tile is active, as in every built layout). A key block may have none. Padding 0 beyond the counts."""

    query_count: torch.Tensor  # int32 [B, H, nkb]
    query_index: torch.Tensor  # int32 [B, H, nkb, max_queries] (max_queries >= 1)


@dataclass
class BlockLayout:
    block_count: torch.Tensor  # int32 [B, H, nqb]
    block_index: torch.Tensor  # int32 [B, H, nqb, max_blocks] (max_blocks >= 1)
    column_count: torch.Tensor  # int32 [B, H, nqb]
    column_index: torch.Tensor  # int32 [B, H, nqb, max_columns] (max_columns >= 1)
    block_size: int
    seq_len: int
    _key_major: KeyMajorLayout | None = field(default=None, init=False, repr=False, compare=False)

    def key_major(self) -> KeyMajorLayout:
        """`transpose_layout(self)`, computed on first use and cached (a layout is not meant to be modified)."""
        if self._key_major is None:
            self._key_major = transpose_layout(self)
        return self._key_major


def active_tiles(pattern: SparsePattern) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: tile (a, b) is computed (b <= a and the slash distance a - b is kept)."""
    nb = pattern.num_blocks
    blocks = torch.arange(nb, device=pattern.vertical.device)
    distance = blocks[:, None] - blocks[None, :]
    tiles = pattern.slash_blocks[..., distance.clamp(min=0)]
    return tiles & (distance >= 0)


def _compact(values: torch.Tensor, keep: torch.Tensor):
    """The kept values of each row (last dim), in their order, then 0 padding, in int32 [..., max(max count, 1)];
    and the int32 counts. A stable compaction (cumsum + scatter, no sort): kept values of ascending rows stay
    ascending. Reads the largest count back to the host to size the result."""
    counts = keep.sum(dim=-1, dtype=torch.int32)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    slot = keep.cumsum(dim=-1, dtype=torch.int32) - 1
    slot = torch.where(keep, slot, width).long()  # dropped values land in the extra column `width`, cut below
    ordered = torch.zeros(*values.shape[:-1], width + 1, dtype=torch.int32, device=values.device)
    ordered.scatter_(-1, slot, values.to(torch.int32))
    return ordered[..., :width].contiguous(), counts


def build_block_layout(pattern: SparsePattern) -> BlockLayout:
    n, g, nb = pattern.seq_len, pattern.block_size, pattern.num_blocks
    device = pattern.vertical.device
    tiles = active_tiles(pattern)
    block_ids = torch.arange(nb, device=device).expand_as(tiles)
    block_index, block_count = _compact(block_ids, tiles)

    # vertical columns per row, ascending, padded with the sentinel n
    columns = torch.arange(n, device=device).expand_as(pattern.vertical)
    width = max(int(pattern.vertical.sum(dim=-1).max()), 1)
    vertical = torch.where(pattern.vertical, columns, n).sort(dim=-1).values[..., :width]
    starts = torch.arange(nb, device=device)[:, None] * g
    candidates = vertical[:, :, None, :].expand(-1, -1, nb, -1)
    column_block = (candidates // g).clamp(max=nb - 1)
    in_tile = tiles.gather(-1, column_block)
    keep = (candidates < starts) & ~in_tile
    column_index, column_count = _compact(candidates, keep)
    return BlockLayout(block_count, block_index, column_count, column_index, g, n)


def tile_matrix(layout: BlockLayout) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: tile (a, b) is listed in `layout.block_index` (equals `active_tiles` of its pattern)."""
    nb = layout.block_count.shape[-1]
    slots = torch.arange(layout.block_index.shape[-1], device=layout.block_index.device)
    listed = slots < layout.block_count[..., None]
    columns = torch.where(listed, layout.block_index.long(), nb)  # padding goes to the extra column nb, cut below
    tiles = torch.zeros(*layout.block_count.shape, nb + 1, dtype=torch.bool, device=columns.device)
    return tiles.scatter_(-1, columns, True)[..., :nb]


def transpose_layout(layout: BlockLayout) -> KeyMajorLayout:
    """The layout's tiles listed by key block (see `KeyMajorLayout`); torch ops on the layout's device."""
    by_key = tile_matrix(layout).transpose(-1, -2)  # [B, H, nkb, nqb]: by_key[..., c, r] = tile (r, c) active
    query_ids = torch.arange(by_key.shape[-1], device=by_key.device).expand_as(by_key)
    query_index, query_count = _compact(query_ids, by_key)
    return KeyMajorLayout(query_count, query_index)


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
