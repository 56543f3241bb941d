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

Both listings follow from the slash distances alone: tile (r, c) is active iff distance r - c is, so with the active
distances t_0 = 0 < t_1 < ... of a head, query block a lists a - t for the t <= a (descending t) and key block c
lists c + t for the t <= nb - 1 - c (ascending t). `build_block_layout` builds them that way (small gathers, two
host syncs to size the outputs) instead of compacting the dense [nb, nb] tile matrix; `transpose_layout` (any
layout, e.g. a hand-made one) and `active_tiles` stay as the direct definitions.
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
    # set by build_block_layout: the pattern's slash_blocks, from which the key-major listing is cheap
    _slash_blocks: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def key_major(self) -> KeyMajorLayout:
        """`transpose_layout(self)`, computed on first use and cached (a layout is not meant to be modified); for a
        built layout, from its slash distances (`key_major_from_slash`, same result, no host sync)."""
        if self._key_major is None:
            if self._slash_blocks is None:
                self._key_major = transpose_layout(self)
            else:
                self._key_major = key_major_from_slash(self._slash_blocks, self.block_index.shape[-1])
        return self._key_major


def active_tiles(pattern: SparsePattern) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: tile (a, b) is computed (b <= a and the slash distance a - b is kept)."""
    nb = pattern.num_blocks
    blocks = torch.arange(nb, device=pattern.vertical.device)
    distance = blocks[:, None] - blocks[None, :]
    tiles = pattern.slash_blocks[..., distance.clamp(min=0)]
    return tiles & (distance >= 0)


def _compact(values: torch.Tensor, keep: torch.Tensor, width: int | None = None):
    """The kept values of each row (last dim), in their order, then 0 padding, in int32 [..., width]; and the int32
    counts. `keep`: bool or int64 0 / 1; `values`: its shape or a broadcast view to it. A stable compaction (cumsum +
    scatter, no sort): kept values of ascending rows stay ascending. width: at least the largest count; None:
    max(largest count, 1), read back to the host."""
    slot = keep.cumsum(dim=-1, dtype=torch.long)  # kept entry -> its 1-based slot
    counts = slot[..., -1].to(torch.int32)
    if width is None:
        (width,) = _widths(counts)
    slot.mul_(keep)  # dropped entries land in the extra column 0, cut below
    ordered = torch.zeros(*keep.shape[:-1], width + 1, dtype=torch.int32, device=keep.device)
    ordered.scatter_(-1, slot, values.to(torch.int32).expand_as(slot))
    return ordered[..., 1:].contiguous(), counts


def _positions(keep: torch.Tensor, fill: int) -> torch.Tensor:
    """int64 [..., L]: the positions of each row's True entries (bool [..., L]), ascending, then `fill`. Fixed
    width L (no host sync); cut it to the largest count."""
    length = keep.shape[-1]
    slot = keep.cumsum(dim=-1).mul_(keep)  # kept entry -> its 1-based slot, dropped -> the extra column 0
    out = torch.full((*keep.shape[:-1], length + 1), fill, dtype=torch.long, device=keep.device)
    out.scatter_(-1, slot, torch.arange(length, device=keep.device).expand_as(slot))
    return out[..., 1:]


def _widths(*counts: torch.Tensor) -> list[int]:
    """max(largest entry, 1) of each integer tensor, read back to the host together (one sync)."""
    one = torch.ones(1, dtype=torch.long, device=counts[0].device)
    return torch.stack([torch.cat([c.flatten().long(), one]).max() for c in counts]).tolist()


def _query_major_blocks(distances: torch.Tensor, block_count: torch.Tensor, width: int) -> torch.Tensor:
    """block_index [B, H, nqb, width]: query block a lists a - t over its active distances t <= a, i.e. slot s holds
    a - distances[block_count[a] - 1 - s] (distances: [B, H, >= width], the active distances ascending)."""
    nb = block_count.shape[-1]
    device = block_count.device
    rank = block_count[..., None].long() - 1 - torch.arange(width, device=device)  # [B, H, nqb, width]
    picked = distances.gather(-1, rank.clamp(min=0).flatten(-2)).view(rank.shape)
    blocks = torch.arange(nb, device=device)[:, None] - picked
    return torch.where(rank >= 0, blocks, 0).to(torch.int32)


def key_major_from_slash(slash_blocks: torch.Tensor, width: int | None = None) -> KeyMajorLayout:
    """The key-major listing of the layout of a pattern with these slash_blocks (bool [B, H, nb]): key block c is
    reached by the query blocks c + t for the active distances t <= nb - 1 - c, ascending. Equals
    `transpose_layout(build_block_layout(pattern))`; `width` = the largest count (the layout's block_index width;
    computed, with a host sync, when None)."""
    nb = slash_blocks.shape[-1]
    device = slash_blocks.device
    query_count = slash_blocks.cumsum(dim=-1, dtype=torch.int32).flip(-1)  # [c]: active distances <= nb - 1 - c
    if width is None:
        (width,) = _widths(query_count)
    distances = _positions(slash_blocks, 0)[..., None, :width]  # [B, H, 1, width]
    listed = torch.arange(width, device=device) < query_count[..., None]
    query_index = torch.where(listed, torch.arange(nb, device=device)[:, None] + distances, 0).to(torch.int32)
    return KeyMajorLayout(query_count, query_index)


def _bar_columns(pattern: SparsePattern, vertical: torch.Tensor):
    """column_index, column_count: per query block a, the vertical columns (`vertical`: ascending int64 [B, H, Wv],
    padded with N) before a*G whose tile (a, column // G) is not active. Reads the largest count back to the host
    to size column_index.

    Column v is a bar of block a iff its distance t = a - v // G is >= 1 and not active; one gather from a table
    over t + nb in [0, 2 nb) (false for t <= 0) decides it (the padding N has t <= 0)."""
    nb = pattern.num_blocks
    slash = pattern.slash_blocks
    no_tile = torch.cat([torch.zeros_like(slash), torch.zeros_like(slash[..., :1]), ~slash[..., 1:]], dim=-1).long()
    shifted = torch.arange(nb, 2 * nb, device=vertical.device)[:, None] - vertical[:, :, None, :] // pattern.block_size
    keep = no_tile.gather(-1, shifted.flatten(-2)).view(shifted.shape)  # [B, H, nqb, Wv], int64 0 / 1
    return _compact(vertical.to(torch.int32)[:, :, None, :], keep)


def build_block_layout(pattern: SparsePattern) -> BlockLayout:
    """The pattern's layout (see the module docstring); two host syncs size block_index and column_index. Its
    key_major() is derived from the slash distances when first asked for."""
    n, g = pattern.seq_len, pattern.block_size
    slash = pattern.slash_blocks
    block_count = slash.cumsum(dim=-1, dtype=torch.int32)  # query block a: the active distances t <= a
    distances = _positions(slash, 0)
    vertical = _positions(pattern.vertical, n)
    block_width, vertical_width = _widths(block_count, pattern.vertical.sum(dim=-1))
    block_index = _query_major_blocks(distances, block_count, block_width)
    column_index, column_count = _bar_columns(pattern, vertical[..., :vertical_width])
    layout = BlockLayout(block_count, block_index, column_count, column_index, g, n)
    layout._slash_blocks = slash
    return layout


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
    query_index, query_count = _compact(torch.arange(by_key.shape[-1], device=by_key.device), by_key)
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
