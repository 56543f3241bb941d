"""The key-major (transposed) layout the backward's dk/dv kernel walks, against a naive loop over the tiles: built
from a layout (`transpose_layout`) or from the pattern's slash distances (`key_major_from_slash`, what
`BlockLayout.key_major()` uses for a built layout)."""

import pytest
import torch

from reasonrl.kernels.layout import (
    BlockLayout,
    KeyMajorLayout,
    active_tiles,
    build_block_layout,
    key_major_from_slash,
    layout_mask,
    tile_matrix,
    transpose_layout,
)
from reasonrl.kernels.pattern import PatternConfig, SparsePattern, dense_pattern, estimate_pattern, pattern_mask


def random_pattern(b, h, n, g, seed, slash_p=0.4, vertical_p=0.2) -> SparsePattern:
    """Independent random slash / vertical sets for every (batch row, head)."""
    generator = torch.Generator().manual_seed(seed)
    slash = torch.rand(b, h, -(-n // g), generator=generator) < slash_p
    slash[..., 0] = True
    return SparsePattern(torch.rand(b, h, n, generator=generator) < vertical_p, slash, g)


def naive_key_major(layout: BlockLayout):
    """For every (b, h, key block c): the query blocks r whose listed tiles include c, ascending."""
    b, h, nb = layout.block_count.shape
    lists = [[[[] for _ in range(nb)] for _ in range(h)] for _ in range(b)]
    for i in range(b):
        for j in range(h):
            for r in range(nb):
                for c in layout.block_index[i, j, r, : layout.block_count[i, j, r]].tolist():
                    lists[i][j][c].append(r)
    return lists


def assert_key_major_matches(layout: BlockLayout, key_major: KeyMajorLayout | None = None):
    """`key_major` (default: transpose_layout(layout)) lists the layout's tiles by key block, as narrow as it can."""
    key_major = transpose_layout(layout) if key_major is None else key_major
    b, h, nb = layout.block_count.shape
    assert key_major.query_count.shape == (b, h, nb) and key_major.query_count.dtype == torch.int32
    assert key_major.query_index.dtype == torch.int32 and key_major.query_index.shape[:3] == (b, h, nb)
    assert key_major.query_index.shape[-1] == max(int(key_major.query_count.max()), 1)
    expected = naive_key_major(layout)
    for i in range(b):
        for j in range(h):
            for c in range(nb):
                count = int(key_major.query_count[i, j, c])
                assert key_major.query_index[i, j, c, :count].tolist() == expected[i][j][c]
                assert not key_major.query_index[i, j, c, count:].any()  # padding is 0
    return key_major


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_major_layout_matches_naive_loop(seed):
    pattern = random_pattern(2, 3, 61, 8, seed)
    layout = build_block_layout(pattern)
    assert torch.equal(tile_matrix(layout), active_tiles(pattern))
    key_major = assert_key_major_matches(layout)
    # with the diagonal tile always active, key block c's list starts with c
    first = key_major.query_index[..., 0]
    assert torch.equal(first, torch.arange(pattern.num_blocks, dtype=torch.int32).expand_as(first))


@pytest.mark.parametrize("n, seed", [(61, 0), (64, 1), (64, 2), (7, 3)])
def test_key_major_from_slash_distances_matches_naive_loop(n, seed):
    """A built layout's key_major() (from the slash distances, no transpose) and key_major_from_slash without a
    width equal the naive loop and transpose_layout, N a multiple of G or not."""
    pattern = random_pattern(2, 3, n, 8, seed, slash_p=0.3)
    layout = build_block_layout(pattern)
    assert torch.equal(layout_mask(layout), pattern_mask(pattern))  # tiles and bar columns, padding column N too
    transposed = transpose_layout(layout)
    for key_major in (layout.key_major(), key_major_from_slash(pattern.slash_blocks)):
        assert_key_major_matches(layout, key_major)
        assert torch.equal(key_major.query_count, transposed.query_count)
        assert torch.equal(key_major.query_index, transposed.query_index)


def test_key_major_of_estimated_and_dense_patterns():
    torch.manual_seed(3)
    q, k = torch.randn(1, 4, 45, 8), torch.randn(1, 2, 45, 8)
    config = PatternConfig(block_size=8, last_q=4, vertical_size=6, slash_size=5, sink=1, local_window=2)
    assert_key_major_matches(build_block_layout(estimate_pattern(q, k, config)))
    key_major = assert_key_major_matches(build_block_layout(dense_pattern(1, 1, 20, 8)))
    assert key_major.query_count.tolist() == [[[3, 2, 1]]]


def test_key_major_with_unreached_key_blocks_and_cache():
    """A hand-made layout whose key block 1 no query block lists (count 0), and a query block without tiles."""
    block_count = torch.tensor([[[1, 1, 0, 2]]], dtype=torch.int32)
    block_index = torch.tensor([[[[0, 0], [0, 0], [0, 0], [2, 3]]]], dtype=torch.int32)
    columns = torch.zeros(1, 1, 4, 1, dtype=torch.int32)
    layout = BlockLayout(block_count, block_index, torch.zeros(1, 1, 4, dtype=torch.int32), columns, 8, 30)
    key_major = assert_key_major_matches(layout)
    assert key_major.query_count.tolist() == [[[2, 0, 1, 1]]]
    assert layout.key_major() is layout.key_major()  # computed once per layout
    assert torch.equal(layout.key_major().query_index, key_major.query_index)
