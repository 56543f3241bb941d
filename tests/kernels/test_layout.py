"""The key-major (transposed) layout the backward's dk/dv kernel walks, against a naive loop over the tiles."""

import pytest
import torch

from reasonrl.kernels.layout import BlockLayout, active_tiles, build_block_layout, tile_matrix, transpose_layout
from reasonrl.kernels.pattern import PatternConfig, SparsePattern, dense_pattern, estimate_pattern


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


def assert_key_major_matches(layout: BlockLayout):
    key_major = transpose_layout(layout)
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
