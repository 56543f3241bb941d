"""The PyTorch reference of sparse attention: dense equivalence, blockwise form, partial merges, varlen dispatch."""

import pytest
import torch
import torch.nn.functional as F

from reasonrl.kernels.attention import (
    SparseAttentionConfig,
    dense_causal_attention,
    segment_bounds,
    sparse_attention,
    varlen_sparse_attention,
)
from reasonrl.kernels.pattern import PatternConfig, dense_pattern, estimate_pattern, pattern_mask
from reasonrl.kernels.reference import (
    blockwise_sparse_attention,
    masked_attention,
    merge_partials,
    reference_sparse_attention,
)

SMALL = PatternConfig(block_size=8, last_q=4, vertical_size=5, slash_size=6, sink=1, local_window=3)


def qkv(b=2, h=4, hk=2, n=37, d=16, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return [torch.randn(b, heads, n, d, dtype=dtype, requires_grad=True) for heads in (h, hk, hk)]


def grads(out, tensors):
    torch.manual_seed(123)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), tensors)


def test_all_keep_pattern_equals_sdpa_forward_and_gradients():
    q, k, v = qkv()
    ours = reference_sparse_attention(q, k, v, dense_pattern(2, 4, 37, 8))
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(ours, sdpa, atol=1e-12)
    for a, b in zip(grads(ours, (q, k, v)), grads(sdpa, (q, k, v)), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_reference_equals_naive_softmax_per_row():
    q, k, v = qkv(b=1, h=2, hk=1, n=19)
    pattern = estimate_pattern(q.detach(), k.detach(), SMALL)
    out = reference_sparse_attention(q, k, v, pattern)
    mask = pattern_mask(pattern)
    for h in range(2):
        for i in range(19):
            keep = mask[0, h, i].nonzero().squeeze(-1)
            weights = torch.softmax(q[0, h, i] @ k[0, 0, keep].T / 4.0, dim=0)
            assert torch.allclose(out[0, h, i], weights @ v[0, 0, keep], atol=1e-12)


@pytest.mark.parametrize("mode", ["topk", "mass"])
def test_blockwise_equals_dense_mask_reference(mode):
    q, k, v = qkv(n=45)
    config = PatternConfig(block_size=8, last_q=4, mode=mode, vertical_size=5, slash_size=6, sink=1, local_window=3,
                           mass=0.6)
    pattern = estimate_pattern(q.detach(), k.detach(), config)
    a = reference_sparse_attention(q, k, v, pattern)
    b = blockwise_sparse_attention(q, k, v, pattern)
    assert torch.allclose(a, b, atol=1e-12)
    for ga, gb in zip(grads(a, (q, k, v)), grads(b, (q, k, v)), strict=True):
        assert torch.allclose(ga, gb, atol=1e-12)


def test_partials_over_disjoint_keys_merge_to_the_whole():
    q, k, v = qkv(n=30)
    pattern = estimate_pattern(q.detach(), k.detach(), SMALL)
    mask = pattern_mask(pattern)
    whole, whole_lse = masked_attention(q, k, v, mask, 0.25)
    even, odd = torch.arange(0, 30, 2), torch.arange(1, 30, 2)
    part_a = masked_attention(q, k[:, :, even], v[:, :, even], mask[..., even], 0.25)
    part_b = masked_attention(q, k[:, :, odd], v[:, :, odd], mask[..., odd], 0.25)
    merged, lse = merge_partials(*part_a, *part_b)
    assert torch.allclose(merged, whole, atol=1e-12) and torch.allclose(lse, whole_lse, atol=1e-12)
    # a partial with no key at all for some rows (lse = -inf) leaves the other untouched
    empty = masked_attention(q, k[:, :, :1], v[:, :, :1], torch.zeros_like(mask[..., :1]), 0.25)
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    merged, lse = merge_partials(whole, whole_lse, *empty)
    assert torch.allclose(merged, whole) and torch.allclose(lse, whole_lse)


def test_dispatch_dense_below_threshold_and_sparse_above():
    q, k, v = qkv(n=40)
    dense = dense_causal_attention(q, k, v)
    assert torch.equal(sparse_attention(q, k, v, SparseAttentionConfig(dense_below=64, pattern=SMALL)), dense)
    sparse = sparse_attention(q, k, v, SparseAttentionConfig(impl="reference", dense_below=0, pattern=SMALL))
    pattern = estimate_pattern(q.detach(), k.detach(), SMALL)
    assert torch.allclose(sparse, reference_sparse_attention(q, k, v, pattern), atol=1e-12)
    assert not torch.allclose(sparse, dense, atol=1e-3)  # the pattern really drops keys
    # the blockwise form takes over above blockwise_above, with the same result
    blockwise = sparse_attention(q, k, v, SparseAttentionConfig(dense_below=0, blockwise_above=16, pattern=SMALL))
    assert torch.allclose(blockwise, sparse, atol=1e-12)
    with pytest.raises(ValueError, match="impl"):
        SparseAttentionConfig(impl="cuda")


def test_segment_bounds():
    ones = torch.ones(9, dtype=torch.bool)
    assert segment_bounds(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3]), ones) == [(0, 3), (3, 5), (5, 9)]
    assert segment_bounds(None, torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool)) == [(2, 5)]
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert segment_bounds(torch.tensor([0, 1, 2, 0, 1, 0, 0, 0]), valid) == [(0, 3), (3, 5)]


def test_varlen_runs_each_sequence_on_its_own():
    q, k, v = qkv(b=2, n=40)
    config = SparseAttentionConfig(dense_below=0, pattern=SMALL)
    positions = torch.tensor([list(range(24)) + list(range(16)), list(range(40))])
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, :6] = 0  # left padding
    out = varlen_sparse_attention(q, k, v, config, padding_mask=padding, position_ids=positions)
    pieces = [(0, 0, 24), (0, 24, 40), (1, 6, 40)]
    for row, start, end in pieces:
        alone = sparse_attention(q[row : row + 1, :, start:end], k[row : row + 1, :, start:end],
                                 v[row : row + 1, :, start:end], config)
        assert torch.allclose(out[row : row + 1, :, start:end], alone, atol=1e-12)
    assert (out[1, :, :6] == 0).all()
    assert all(g is not None for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_dispatch_to_triton_equals_the_reference():
    """impl=triton through the dispatcher (compiled on a GPU; on CPU the kernels run under the Triton interpreter)."""
    from reasonrl.kernels.triton_sparse import INTERPRET

    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    q, k, v = (t.detach().to(device).requires_grad_() for t in qkv(b=1, n=40, dtype=torch.float32))
    config = PatternConfig(block_size=16, last_q=4, vertical_size=5, slash_size=6, sink=1, local_window=3)
    ours = sparse_attention(q, k, v, SparseAttentionConfig(impl="triton", dense_below=0, pattern=config))
    pattern = estimate_pattern(q.detach(), k.detach(), config)
    reference = reference_sparse_attention(q, k, v, pattern)
    assert torch.allclose(ours, reference, atol=1e-5)
    for a, b in zip(grads(ours, (q, k, v)), grads(reference, (q, k, v)), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
