"""Triton sparse attention kernels against the PyTorch reference: compiled on a CUDA device when there is one,
run by Triton's CPU interpreter otherwise (the tensors live on `DEVICE`).

Forward out and lse, and gradients in q, k, v (through out and lse), for estimated (top-k, mass), dense, bar-free and
bar-heavy patterns, head dims 16 and 32, GQA (also with different patterns per head of a group, and key blocks that
no tile of the group reaches), sequence lengths that are not a multiple of the tile size, fp32 and bf16/fp16. The references run in float64 on the same input values, on the same device. Random values are drawn
on the CPU and moved to `DEVICE`, so every device sees the same inputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from reasonrl.kernels import triton_sparse
from reasonrl.kernels.layout import BlockLayout, build_block_layout, layout_mask, tile_matrix
from reasonrl.kernels.pattern import (
    PatternConfig,
    SparsePattern,
    dense_pattern,
    estimate_pattern,
    num_blocks,
    pattern_mask,
)
from reasonrl.kernels.reference import masked_attention, reference_sparse_attention
from reasonrl.kernels.triton_sparse import INTERPRET, triton_sparse_attention

# compiled kernels need CUDA tensors; the interpreter (no CUDA, or TRITON_INTERPRET=1) runs on CPU tensors
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")

PATTERN_KINDS = ["topk", "mass", "dense", "no_vertical", "bars"]
TIGHT = {"atol": 1e-4, "rtol": 1e-4}
LOOSE = {torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}, torch.float16: {"atol": 5e-3, "rtol": 5e-3}}


def qkv(b=1, h=4, hk=2, n=77, d=16, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(b, heads, n, d).to(dtype).to(DEVICE).requires_grad_() for heads in (h, hk, hk)]


def make_pattern(kind: str, q, k, block_size: int = 16, seed: int = 1) -> SparsePattern:
    """Test patterns. topk: some tiles dropped, a few bars. bars: only the diagonal tiles plus scattered vertical
    columns, so most kept keys are bars."""
    b, h, n, _ = q.shape
    q, k = q.detach().float(), k.detach().float()
    small = {"block_size": block_size, "last_q": 8, "sink": 2, "local_window": 4}
    if kind == "topk":
        return estimate_pattern(q, k, PatternConfig(vertical_size=8, slash_size=5, **small))
    if kind == "mass":  # random inputs give flat scores: a low mass keeps the pattern from being all-dense
        return estimate_pattern(q, k, PatternConfig(mode="mass", mass=0.15, **small))
    if kind == "dense":
        return dense_pattern(b, h, n, block_size, device=DEVICE)
    generator = torch.Generator().manual_seed(seed)
    blocks = num_blocks(n, block_size)
    if kind == "no_vertical":
        slash = torch.rand(b, h, blocks, generator=generator) < 0.4
        vertical = torch.zeros(b, h, n, dtype=torch.bool)
    elif kind == "bars":
        slash = torch.zeros(b, h, blocks, dtype=torch.bool)
        vertical = torch.rand(b, h, n, generator=generator) < 0.25
    else:
        raise ValueError(kind)
    slash[..., 0] = True
    return SparsePattern(vertical.to(DEVICE), slash.to(DEVICE), block_size)


def outputs_and_grads(fn, tensors, seed=123):
    """(out, lse, dq, dk, dv) of `fn(*tensors) -> (out, lse)` with random weights on out and lse in the loss."""
    out, lse = fn(*tensors)
    torch.manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, dtype=torch.float64).to(out.device)).sum()
    loss = loss + (lse.double() * torch.randn(lse.shape, dtype=torch.float64).to(lse.device)).sum()
    return (out, lse, *torch.autograd.grad(loss, tensors))


def float64_leaves(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_close(ours, expected, tol):
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, ours, expected, strict=True):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, name=name: f"{name}: {m}")


def check_against_reference(q, k, v, pattern, tol, scale=None, block_n=None):
    layout = build_block_layout(pattern)
    ours = outputs_and_grads(
        lambda *t: triton_sparse_attention(*t, layout, scale=scale, return_lse=True, block_n=block_n), (q, k, v))
    for a, t in zip(ours[2:], (q, k, v), strict=True):
        assert a.dtype == t.dtype and a.shape == t.shape
    assert ours[0].dtype == q.dtype and ours[1].dtype == torch.float32

    expected = outputs_and_grads(
        lambda *t: reference_sparse_attention(*t, pattern, scale=scale, return_lse=True), float64_leaves((q, k, v)))
    assert_close(ours, expected, tol)
    return layout, ours


@pytest.mark.parametrize("kind", PATTERN_KINDS)
def test_fp32_matches_reference_and_layout_mask(kind):
    q, k, v = qkv()
    pattern = make_pattern(kind, q, k)
    layout, ours = check_against_reference(q, k, v, pattern, TIGHT)

    # the tile-expanded layout (what the kernel walks) keeps exactly the pattern's pairs
    mask = layout_mask(layout)
    assert torch.equal(mask, pattern_mask(pattern))
    out, lse = masked_attention(*(t.detach().double() for t in (q, k, v)), mask, q.shape[-1] ** -0.5)
    torch.testing.assert_close(ours[0].double(), out, **TIGHT)
    torch.testing.assert_close(ours[1].double(), lse, **TIGHT)

    full = layout.block_count.numel() * (layout.block_count.shape[-1] + 1) // 2  # tiles of the dense layout
    if kind == "topk":
        assert layout.column_count.sum() > 0 and layout.block_count.sum() < full
    if kind == "bars":
        assert layout.column_count.max() > 16  # several gathers per block
    if kind == "no_vertical":
        assert layout.column_count.sum() == 0


@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("h, hk", [(2, 2), (4, 2)])
def test_head_dims_and_gqa(d, h, hk):
    q, k, v = qkv(b=2, h=h, hk=hk, n=50, d=d, seed=d + h)
    check_against_reference(q, k, v, make_pattern("topk", q, k), TIGHT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["topk", "bars"])
def test_half_precision(dtype, kind):
    q, k, v = qkv(n=61, dtype=dtype)
    check_against_reference(q, k, v, make_pattern(kind, q, k), LOOSE[dtype])


def test_tiles_wider_than_block_n_and_custom_scale():
    """G = 32 tiles visited 16 keys at a time: the diagonal tile's causal mask spans two sub-blocks."""
    q, k, v = qkv(n=77, d=16)
    check_against_reference(q, k, v, make_pattern("bars", q, k, block_size=32), TIGHT, scale=0.3, block_n=16)


def without_key_block(layout: BlockLayout, heads, key_block: int) -> BlockLayout:
    """`layout` minus the tiles (r, key_block) of `heads`: no query block of those heads reaches that key block
    through a tile (bar columns in it stay, and they never lie in an active tile, so keys are still counted once)."""
    tiles = tile_matrix(layout).clone()
    tiles[:, heads, :, key_block] = False
    nb = tiles.shape[-1]
    ids = torch.where(tiles, torch.arange(nb, device=tiles.device), nb).sort(dim=-1).values
    index = torch.where(ids < nb, ids, 0).to(torch.int32)
    return BlockLayout(tiles.sum(dim=-1, dtype=torch.int32), index, layout.column_count, layout.column_index,
                       layout.block_size, layout.seq_len)


@pytest.mark.parametrize("n, block_size, block_n, key_block", [(77, 16, None, 2), (100, 32, 16, 1)])
def test_gqa_heads_with_own_patterns_and_an_unreached_key_block(n, block_size, block_n, key_block):
    """Query heads 0 and 1 (key/value head 0) have different random patterns and none of their tiles covers
    `key_block`: its keys get dk = dv = 0 from the tiles, and gradient only through bar columns. Compared with
    float64 attention under the layout's own mask."""
    q, k, v = qkv(h=4, hk=2, n=n, seed=5)
    generator = torch.Generator().manual_seed(7)
    blocks = num_blocks(n, block_size)
    slash = torch.rand(1, 4, blocks, generator=generator) < 0.5
    slash[..., :2] = True  # distance 1: query block `key_block` keeps a tile once its diagonal one is dropped
    slash[..., 2] = False  # distance 2: query block `key_block` + 2 sees the block's vertical columns as bars
    vertical = torch.rand(1, 4, n, generator=generator) < 0.3
    pattern = SparsePattern(vertical.to(DEVICE), slash.to(DEVICE), block_size)
    layout = without_key_block(build_block_layout(pattern), [0, 1], key_block)
    assert layout.key_major().query_count[0, :2, key_block].tolist() == [0, 0]

    ours = outputs_and_grads(
        lambda *t: triton_sparse_attention(*t, layout, return_lse=True, block_n=block_n), (q, k, v))
    mask = layout_mask(layout)
    expected = outputs_and_grads(lambda *t: masked_attention(*t, mask, q.shape[-1] ** -0.5), float64_leaves((q, k, v)))
    assert_close(ours, expected, TIGHT)

    keys = torch.arange(key_block * block_size, (key_block + 1) * block_size)
    seen = mask[0, :2, :, keys].any(dim=(0, 1)).cpu()  # keys of the block that some query of heads 0, 1 sees (bars)
    assert seen.any() and not seen.all()
    dk, dv = ours[3][0, 0, keys].cpu(), ours[4][0, 0, keys].cpu()
    assert (dk[~seen] == 0).all() and (dv[~seen] == 0).all()
    assert (dv[seen].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("query_step, block_n", [(16, 32), (32, 16)])
def test_dkdv_query_step_other_than_block_n(monkeypatch, query_step, block_n):
    """The dk/dv kernel's query rows per step (a launch setting) does not change the result."""
    monkeypatch.setattr(triton_sparse, "DKDV_QUERY_STEP", query_step)
    q, k, v = qkv(h=4, hk=2, n=77)
    check_against_reference(q, k, v, make_pattern("topk", q, k, block_size=32), TIGHT, block_n=block_n)


def test_dense_pattern_equals_sdpa_causal():
    q, k, v = qkv(b=2, h=4, hk=2, n=45, d=32)
    layout = build_block_layout(dense_pattern(2, 4, 45, 16, device=DEVICE))

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out, torch.zeros(out.shape[:3], dtype=out.dtype, device=out.device)  # lse: weight 0 in the loss's random sum

    no_lse = torch.zeros(q.shape[:3], device=DEVICE)
    ours = outputs_and_grads(lambda *t: (triton_sparse_attention(*t, layout), no_lse), (q, k, v))
    expected = outputs_and_grads(sdpa, float64_leaves((q, k, v)))
    for a, b in zip(ours[2:] + ours[:1], expected[2:] + expected[:1], strict=True):
        torch.testing.assert_close(a.double(), b, **TIGHT)


def test_non_contiguous_inputs_and_no_grad():
    torch.manual_seed(0)
    q = torch.randn(1, 40, 2, 16).to(DEVICE).transpose(1, 2)  # [B, H, N, D] view of a [B, N, H, D] tensor
    k = torch.randn(1, 40, 1, 16).to(DEVICE).transpose(1, 2)
    v = torch.randn(1, 40, 1, 16).to(DEVICE).transpose(1, 2)
    pattern = make_pattern("topk", q, k)
    with torch.no_grad():
        out = triton_sparse_attention(q, k, v, build_block_layout(pattern))
    torch.testing.assert_close(out, reference_sparse_attention(q, k, v, pattern), **TIGHT)


def test_gradient_through_lse_alone():
    """A loss on lse only (out unused, its gradient None): d lse_i / d s_ij = p_ij."""
    q, k, v = qkv(h=2, hk=1, n=40)
    pattern = make_pattern("bars", q, k)
    _, lse = triton_sparse_attention(q, k, v, build_block_layout(pattern), return_lse=True)
    ours = torch.autograd.grad(lse.sum(), (q, k))
    leaves = float64_leaves((q, k, v))
    _, expected_lse = reference_sparse_attention(*leaves, pattern, return_lse=True)
    expected = torch.autograd.grad(expected_lse.sum(), leaves[:2])
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a.double(), b, **TIGHT)


def test_invalid_inputs_raise_clear_errors():
    q, k, v = (t.detach() for t in qkv(h=2, hk=1, n=20, d=16))
    layout = build_block_layout(dense_pattern(1, 2, 20, 16, device=DEVICE))
    for d in (8, 24):
        bad = [torch.randn(1, heads, 20, d, device=DEVICE) for heads in (2, 1, 1)]
        with pytest.raises(ValueError, match="power of two >= 16"):
            triton_sparse_attention(*bad, layout)
    with pytest.raises(ValueError, match="block_size"):
        triton_sparse_attention(q, k, v, build_block_layout(dense_pattern(1, 2, 20, 8, device=DEVICE)))
    with pytest.raises(ValueError, match="does not match"):
        triton_sparse_attention(q, k, v, build_block_layout(dense_pattern(1, 2, 21, 16, device=DEVICE)))
    with pytest.raises(ValueError, match="dtype"):
        triton_sparse_attention(q, k.double(), v, layout)
    with pytest.raises(ValueError, match="multiple"):
        triton_sparse_attention(q, *torch.randn(2, 1, 3, 20, 16, device=DEVICE), layout)
    with pytest.raises(ValueError, match="block_n"):
        triton_sparse_attention(q, k, v, layout, block_n=32)
    if DEVICE.type == "cuda":  # the compiled kernels refuse CPU tensors
        with pytest.raises(ValueError, match="CUDA tensors"):
            triton_sparse_attention(q.cpu(), k.cpu(), v.cpu(), layout)


IMPORT_ORDER_SCRIPT = """
import os
import triton.language  # imported first, without TRITON_INTERPRET: tl.max, tl.sum, ... are compiled-mode @jit
import torch
from reasonrl.kernels.layout import build_block_layout
from reasonrl.kernels.pattern import dense_pattern
from reasonrl.kernels.triton_sparse import triton_sparse_attention
assert "TRITON_INTERPRET" not in os.environ  # the module does not change the process environment
q = torch.randn(1, 1, 20, 16)
out = triton_sparse_attention(q, q, q, build_block_layout(dense_pattern(1, 1, 20, 16)))
expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
assert torch.allclose(out, expected, atol=1e-5)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter set-up")
def test_works_when_triton_was_imported_first_without_interpreter():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT], env=env, cwd=Path(__file__).parents[2],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
