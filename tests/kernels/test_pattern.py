"""Vertical-slash pattern semantics, estimation (hand-built attention maps) and the kernel layout."""

import pytest
import torch

from reasonrl.kernels.layout import active_tiles, build_block_layout, layout_mask
from reasonrl.kernels.pattern import (
    PatternConfig,
    SparsePattern,
    dense_pattern,
    diagonal_sums,
    estimate_pattern,
    last_query_logits,
    last_query_scores,
    partial_scores,
    pattern_mask,
    select_pattern,
    slash_offsets_to_blocks,
)


def test_slash_offsets_activate_the_tiles_the_diagonal_crosses():
    # G = 4, 12 offsets: d = 4 lies exactly one tile away; d = 5 crosses tile distances 1 and 2
    slash = torch.zeros(12, dtype=torch.bool)
    assert slash_offsets_to_blocks(slash, 4).tolist() == [True, False, False]  # the diagonal tile is always kept
    slash[4] = True
    assert slash_offsets_to_blocks(slash, 4).tolist() == [True, True, False]
    slash[4], slash[5] = False, True
    assert slash_offsets_to_blocks(slash, 4).tolist() == [True, True, True]


def test_pattern_mask_by_hand():
    # N = 6, G = 2; vertical column 0; slash tiles: distance 0 only
    pattern = SparsePattern(torch.tensor([[[True, False, False, False, False, False]]]),
                            torch.tensor([[[True, False, False]]]), 2)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(pattern_mask(pattern)[0, 0], expected)
    # positions select rows / columns of the same mask (what a ring rank computes)
    q_pos, k_pos = torch.tensor([3, 5]), torch.tensor([0, 2, 4])
    assert torch.equal(pattern_mask(pattern, q_pos, k_pos)[0, 0], expected[q_pos][:, k_pos])


def test_mask_equals_naive_loop_over_pairs():
    torch.manual_seed(0)
    n, g = 23, 4
    vertical = torch.rand(2, 3, n) < 0.2
    slash_blocks = torch.rand(2, 3, 6) < 0.4
    slash_blocks[..., 0] = True  # the diagonal tile is part of every pattern
    pattern = SparsePattern(vertical, slash_blocks, g)
    mask = pattern_mask(pattern)
    for b in range(2):
        for h in range(3):
            for i in range(n):
                for j in range(n):
                    kept = j <= i and (bool(slash_blocks[b, h, i // g - j // g]) or bool(vertical[b, h, j]))
                    assert bool(mask[b, h, i, j]) == kept


def test_hand_built_map_recovers_vertical_and_slash_lines():
    # 8 last queries over N = 64 keys: mass on columns {5, 40} and on diagonals {0, 3, 17}; tiny noise elsewhere
    n, m = 64, 8
    q_pos = torch.arange(n - m, n)
    k_pos = torch.arange(n)
    logits = torch.full((1, 1, m, n), -8.0)
    logits[..., 5] = 4.0
    logits[..., 40] = 4.0
    for d in (0, 3, 17):
        logits[0, 0, torch.arange(m), q_pos - d] = 4.0
    logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    vertical, slash = partial_scores(logits, q_pos, k_pos, n, "softmax")
    config = PatternConfig(block_size=8, vertical_size=2, slash_size=3, sink=0, local_window=0)
    pattern = select_pattern(vertical, slash, config)
    assert pattern.vertical[0, 0].nonzero().squeeze(-1).tolist() == [5, 40]
    top_slash = slash[0, 0].topk(3).indices.sort().values.tolist()
    assert top_slash == [0, 3, 17]
    assert pattern.slash_blocks[0, 0].nonzero().squeeze(-1).tolist() == [0, 1, 2, 3]  # 3 -> 0,1; 17 -> 2,3
    # cumulative mass: the two columns hold ~41% of the column scores (the diagonals spread the rest over single
    # columns), the three diagonals ~62% of the diagonal scores: 35% / 50% keep exactly them
    vertical_mass = select_pattern(vertical, slash, PatternConfig(block_size=8, mode="mass", mass=0.35))
    assert vertical_mass.vertical[0, 0].nonzero().squeeze(-1).tolist() == [5, 40]
    slash_mass = select_pattern(vertical, slash, PatternConfig(block_size=8, mode="mass", mass=0.5))
    assert slash_mass.slash_blocks[0, 0].nonzero().squeeze(-1).tolist() == [0, 1, 2, 3]
    looser = select_pattern(vertical, slash, PatternConfig(block_size=8, mode="mass", mass=0.9))
    assert looser.vertical[0, 0].sum() > 2


def test_estimation_from_queries_and_keys_finds_aligned_columns():
    # keys 9 and 30 point along the direction every query points to: they dominate the vertical scores
    torch.manual_seed(0)
    n, d = 48, 16
    direction = torch.randn(d)
    q = 0.1 * torch.randn(1, 2, n, d) + direction
    k = 0.1 * torch.randn(1, 1, n, d)
    k[0, 0, [9, 30]] = 3 * direction
    config = PatternConfig(block_size=8, last_q=8, vertical_size=2, slash_size=1, sink=0, local_window=0)
    pattern = estimate_pattern(q, k, config)
    for head in range(2):  # GQA: both query heads read kv head 0
        assert pattern.vertical[0, head].nonzero().squeeze(-1).tolist() == [9, 30]


def test_topk_forces_sinks_and_local_window():
    scores = torch.zeros(1, 1, 40)
    scores[..., 20] = 5.0
    config = PatternConfig(block_size=8, vertical_size=4, slash_size=3, sink=3, local_window=3)
    pattern = select_pattern(scores, torch.zeros(1, 1, 40), config)
    assert pattern.vertical[0, 0].nonzero().squeeze(-1).tolist() == [0, 1, 2, 20]
    # offsets 0, 1, 2: offsets 1 and 2 reach into the previous key tile
    assert pattern.slash_blocks[0, 0].tolist() == [True, True, False, False, False]


def test_softmax_scores_sum_to_the_number_of_queries():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    q_pos, k_pos = torch.arange(22, 30), torch.arange(30)
    logits = last_query_logits(q[:, :, 22:], k, q_pos, k_pos, 8**-0.5)
    vertical, slash = partial_scores(logits, q_pos, k_pos, 30, "softmax")
    assert torch.allclose(vertical.sum(-1), torch.full((1, 2), 8.0))
    assert torch.allclose(slash.sum(-1), torch.full((1, 2), 8.0))
    # the same scores from two disjoint key subsets, each normalised by the global log-sum-exp
    lse = torch.logsumexp(logits, -1)
    parts = [partial_scores(logits[..., idx], q_pos, k_pos[idx], 30, "softmax", lse)
             for idx in (torch.arange(0, 30, 2), torch.arange(1, 30, 2))]
    assert torch.allclose(parts[0][0] + parts[1][0], vertical, atol=1e-6)
    assert torch.allclose(parts[0][1] + parts[1][1], slash, atol=1e-6)


@pytest.mark.parametrize("m, n", [(8, 45), (8, 8), (1, 10), (5, 6)])
def test_diagonal_sums_equal_the_scatter_over_offsets(m, n):
    torch.manual_seed(m * 100 + n)
    q_pos, k_pos = torch.arange(n - m, n), torch.arange(n)
    logits = torch.randn(2, 3, m, n).masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    _, slash = partial_scores(logits, q_pos, k_pos, n, "logits")  # index_add over i - j
    assert torch.allclose(diagonal_sums(logits.nan_to_num(neginf=0.0)), slash, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, last_q", [(45, 8), (6, 8), (33, 1)])
@pytest.mark.parametrize("normalize", ["softmax", "logits"])
def test_last_query_scores_equal_the_generic_path(n, last_q, normalize):
    """estimate_pattern's in-place scores (GQA without repeated keys) = partial_scores(last_query_logits(...))."""
    torch.manual_seed(n)
    q, k = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8)
    m = min(last_q, n)
    q_pos, k_pos = torch.arange(n - m, n), torch.arange(n)
    expected = partial_scores(last_query_logits(q[:, :, n - m :], k, q_pos, k_pos, 0.3), q_pos, k_pos, n, normalize)
    for ours, ref in zip(last_query_scores(q, k, m, 0.3, normalize), expected, strict=True):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "mass"])
def test_estimated_pattern_equals_the_generic_path(mode):
    """The same columns and diagonals as select_pattern on the generic scores, at a size with many candidates."""
    torch.manual_seed(4)
    n = 2048
    q, k = torch.randn(1, 6, n, 16), torch.randn(1, 2, n, 16)
    config = PatternConfig(block_size=16, last_q=32, mode=mode, vertical_size=100, slash_size=300, sink=4,
                           local_window=20, mass=0.5)
    q_pos, k_pos = torch.arange(n - 32, n), torch.arange(n)
    scores = partial_scores(last_query_logits(q[:, :, n - 32 :], k, q_pos, k_pos, 0.25), q_pos, k_pos, n, "softmax")
    expected = select_pattern(*scores, config)
    ours = estimate_pattern(q, k, config, scale=0.25)
    assert torch.equal(ours.vertical, expected.vertical)
    assert torch.equal(ours.slash_blocks, expected.slash_blocks)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        PatternConfig(mode="nope")
    with pytest.raises(ValueError, match="mass"):
        PatternConfig(mass=1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_walks_exactly_the_pattern(seed):
    torch.manual_seed(seed)
    q, k = torch.randn(2, 4, 45, 8), torch.randn(2, 2, 45, 8)
    pattern = estimate_pattern(q, k, PatternConfig(block_size=8, last_q=4, vertical_size=6, slash_size=5, sink=1,
                                                   local_window=2))
    layout = build_block_layout(pattern)
    assert torch.equal(layout_mask(layout), pattern_mask(pattern))
    assert layout.block_index.shape[-1] == int(layout.block_count.max())  # as wide as the largest count (>= 1)
    assert layout.column_index.shape[-1] == max(int(layout.column_count.max()), 1)
    tiles = active_tiles(pattern)
    for b in range(2):
        for h in range(4):
            for a in range(pattern.num_blocks):
                blocks = layout.block_index[b, h, a, : layout.block_count[b, h, a]].tolist()
                assert blocks == tiles[b, h, a].nonzero().squeeze(-1).tolist() and blocks[-1] == a
                columns = layout.column_index[b, h, a, : layout.column_count[b, h, a]].tolist()
                assert columns == sorted(columns) and all(c < a * 8 and not tiles[b, h, a, c // 8] for c in columns)
                assert not layout.block_index[b, h, a, len(blocks) :].any()  # padding is 0
                assert not layout.column_index[b, h, a, len(columns) :].any()


def test_dense_pattern_layout_has_every_tile_and_no_bars():
    layout = build_block_layout(dense_pattern(1, 1, 20, 8))
    assert layout.block_count.tolist() == [[[1, 2, 3]]]
    assert layout.column_count.tolist() == [[[0, 0, 0]]]
