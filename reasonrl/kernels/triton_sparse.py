"""Triton kernels of vertical-slash sparse attention, forward and backward, walking a `BlockLayout`.

A query-major program handles one query block (G = `layout.block_size` rows) of one (batch row, query head). Its
kept keys are the active key tiles `block_index[:block_count]` (G keys each, visited BLOCK_N at a time; the last tile
is the diagonal one, where the causal mask `col <= row` bites) and the bar columns `column_index[:column_count]`
(gathered by index, BLOCK_N at a time). For a query row i with kept keys K_i and logits s_ij = scale * q_i . k_j:

forward (FlashAttention-2): lse_i = log sum_{j in K_i} exp(s_ij), p_ij = exp(s_ij - lse_i), o_i = sum_j p_ij v_j, in
    one pass over K_i with a running max m_i, a running sum l_i = sum_j exp(s_ij - m_i) and an unnormalised
    accumulator acc_i = sum_j exp(s_ij - m_i) v_j; when m_i grows to m', l_i and acc_i are multiplied by
    exp(m_i - m'). At the end o_i = acc_i / l_i and lse_i = m_i + log l_i. The kernel works in base 2: the float32
    scores q_i . k_j are multiplied by scale * log2(e) (scaling them rather than the Q tile avoids rounding a scaled
    Q back to bf16/fp16), so exp becomes exp2, and the stored lse is converted back to natural log.
backward: with dO the output gradient and dlse the lse gradient (0 when unused), p is recomputed from the saved lse,
    delta_i = sum_d dO_id O_id - dlse_i, dp_ij = dO_i . v_j, ds_ij = p_ij (dp_ij - delta_i) (the softmax Jacobian;
    the dlse term adds p_ij dlse_i because d lse_i / d s_ij = p_ij), and
    dq_i = scale sum_j ds_ij k_j, dk_j = scale sum_i ds_ij q_i, dv_j = sum_i p_ij dO_i.
    As in FlashAttention-2, two kernels recompute p and ds, each accumulating its own gradients in registers:
    - `_sparse_dkdv_kernel`, key-major: a program owns BLOCK_N keys of one key/value head and walks, for each query
      head of its GQA group, the query blocks whose tile covers its key block (`layout.key_major()`), storing dk, dv
      once. No atomics, deterministic.
    - `_sparse_dq_kernel`, query-major: the forward's walk, dq stored once. A bar column is shared by many query
      blocks, so the bars' dk/dv contributions are atomically added here (a few columns per query block) onto the
      float32 dk/dv that the first kernel stored. Only that part depends on float addition order (GPU bitwise
      non-determinism, as in most FlashAttention backwards).

Without CUDA the kernels run in Triton's CPU interpreter (see `_jit`); that is slow and meant for tests.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - triton ships with torch on Linux
    raise ImportError(
        "reasonrl.kernels.triton_sparse needs the `triton` package (pip install triton); "
        "the PyTorch reference reasonrl.kernels.reference computes the same attention without it"
    ) from err

from reasonrl.kernels.layout import BlockLayout

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Interpret the kernels when no CUDA device is present (CPU tensors) or when the user asks for it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()


@contextlib.contextmanager
def _interpreter_env():
    """TRITON_INTERPRET=1 for the duration of the block, then the environment as it was."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _jit(fn):
    """`triton.jit`, built for Triton's CPU interpreter when `INTERPRET` is set.

    `triton.jit` reads TRITON_INTERPRET when it decorates a function (Triton 3.x: `triton.knobs.runtime.interpret`,
    looked up at every decoration), not when triton is imported. Setting it around our own decorations is therefore
    enough, whichever library imported triton first, and the process environment is left as it was (other libraries'
    kernels keep their mode). One catch: triton.language's own @jit helpers (tl.max, tl.sum, tl.zeros, tl.cdiv, ...)
    were decorated when triton.language was first imported, and an interpreted kernel cannot call them if that
    happened without TRITON_INTERPRET=1 (vllm, peft and torch._inductor import triton.language; torch alone does
    not). The kernels below therefore call only Triton builtins (tl.load, tl.dot, tl.full, tl.reduce, ...).
    """
    if not INTERPRET:
        return triton.jit(fn)
    with _interpreter_env():
        return triton.jit(fn)


# Row reductions through tl.reduce with Triton's own combine functions, i.e. what tl.max / tl.sum do, minus the @jit
# wrapper (see `_jit`). The interpreter recognises these two combine functions (private names of Triton 3.x's
# triton.language.standard) and reduces with numpy; a combine function of our own would run element by element in
# Python, about 15x slower.
_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine
_LN2 = tl.constexpr(math.log(2.0))
_LOG2E = tl.constexpr(math.log2(math.e))


@_jit
def _load_rows(base, index, ok, HEAD_DIM: tl.constexpr):
    """Rows `index` of a contiguous [*, HEAD_DIM] matrix starting at `base`; rows with `ok` false read as 0."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(base + index[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)


@_jit
def _program_offsets(seq_len, num_heads, num_kv_heads, num_q_blocks):
    """Element offsets of this program's query head and key/value head ([N, D] matrices of contiguous [B, H, N, D]
    tensors, int64 so that large tensors do not overflow), and its row in the layout's [B, H, nqb] tensors."""
    q_block, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // (num_heads // num_kv_heads)
    q_matrix = (batch * num_heads + head).to(tl.int64) * seq_len
    kv_matrix = (batch * num_kv_heads + kv_head).to(tl.int64) * seq_len
    layout_row = (batch * num_heads + head).to(tl.int64) * num_q_blocks + q_block
    return q_matrix, kv_matrix, layout_row


@_jit
def _online_softmax_step(acc, m_i, l_i, q, k_base, v_base, rows, cols, col_ok, qk_scale, HEAD_DIM: tl.constexpr,
                         DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold BLOCK_N keys `cols` (those with `col_ok`, causally visible) into the running (acc, m, l), base 2."""
    key_ptrs = cols[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_base + key_ptrs, mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(v_base + key_ptrs, mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = (cols[None, :] <= rows[:, None]) & col_ok[None, :]  # causal: a no-op except on the diagonal tile
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX_COMBINE))
    # a row that has seen no key yet keeps m = -inf; shift by 0 instead, so exp2(-inf - -inf) = NaN never happens
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
    acc = acc * alpha[:, None] + tl.dot(p.to(DTYPE).to(DOT_DTYPE), v, input_precision=PRECISION)
    return acc, m_new, l_i


@_jit
def _sparse_forward_kernel(Q, K, V, Out, Lse, BlockCount, BlockIndex, ColumnCount, ColumnIndex,
                           seq_len, num_heads, num_kv_heads, num_q_blocks, max_blocks, max_columns, qk_scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                           DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (num_q_blocks, H, B). Out [B, H, N, D] in q's dtype, Lse [B, H, N] float32 (natural log)."""
    q_matrix, kv_matrix, layout_row = _program_offsets(seq_len, num_heads, num_kv_heads, num_q_blocks)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    q = _load_rows(Q + q_matrix * HEAD_DIM, rows, row_ok, HEAD_DIM).to(DOT_DTYPE)
    k_base = K + kv_matrix * HEAD_DIM
    v_base = V + kv_matrix * HEAD_DIM
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)

    # (a) active key tiles, each G = BLOCK_M keys wide, BLOCK_N keys at a time
    for slot in range(tl.load(BlockCount + layout_row)):
        tile_start = tl.load(BlockIndex + layout_row * max_blocks + slot).to(tl.int64) * BLOCK_M
        for offset in tl.static_range(0, BLOCK_M, BLOCK_N):
            cols = tile_start + offset + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_base, v_base, rows, cols, cols < seq_len,
                                                 qk_scale, HEAD_DIM, DTYPE, DOT_DTYPE, PRECISION)
    # (b) bar columns, gathered by index BLOCK_N at a time (all precede the block: no causal mask needed)
    num_columns = tl.load(ColumnCount + layout_row)
    for start in range(0, num_columns, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        col_ok = slots < num_columns
        cols = tl.load(ColumnIndex + layout_row * max_columns + slots, mask=col_ok, other=0).to(tl.int64)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_base, v_base, rows, cols, col_ok,
                                             qk_scale, HEAD_DIM, DTYPE, DOT_DTYPE, PRECISION)

    # epilogue: o = acc / l, lse = ln 2 * (m + log2 l); a row without keys (impossible for a built layout: the
    # diagonal tile is always active) would give o = 0, lse = -inf like the reference
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    dims = tl.arange(0, HEAD_DIM)
    out_ptrs = Out + q_matrix * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptrs, out.to(DTYPE), mask=row_ok[:, None])
    tl.store(Lse + q_matrix + rows, lse, mask=row_ok)


@_jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, rows, row_ok, cols, col_ok, scale, qk_scale,
             SCATTER_DKDV: tl.constexpr, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
             PRECISION: tl.constexpr):
    """Gradients through BLOCK_N keys `cols` of a query block: returns dq + dS K (unscaled). With SCATTER_DKDV (bar
    columns) also atomically adds these keys' dk = scale dS^T Q and dv = P^T dO to the float32 dk/dv buffers."""
    key_ptrs = cols[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_base + key_ptrs, mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(v_base + key_ptrs, mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = (cols[None, :] <= rows[:, None]) & col_ok[None, :] & row_ok[:, None]
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(DTYPE).to(DOT_DTYPE)
    dq += tl.dot(ds, k, input_precision=PRECISION)
    if SCATTER_DKDV:
        p = p.to(DTYPE).to(DOT_DTYPE)
        dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION) * scale
        dv = tl.dot(tl.trans(p), do, input_precision=PRECISION)
        # relaxed: plain accumulation, ordered against the other kernels by the launches themselves
        tl.atomic_add(dk_base + key_ptrs, dk, mask=col_ok[:, None], sem="relaxed")
        tl.atomic_add(dv_base + key_ptrs, dv, mask=col_ok[:, None], sem="relaxed")
    return dq


@_jit
def _sparse_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, DK, DV, BlockCount, BlockIndex, ColumnCount, ColumnIndex,
                      seq_len, num_heads, num_kv_heads, num_q_blocks, max_blocks, max_columns, scale, qk_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (num_q_blocks, H, B): dq of one query block (BLOCK_M = G rows) of one (batch row, query head), and the
    bar columns' dk/dv.

    Walks the forward's keys (active tiles, then bar columns), recomputing P from the saved lse, and stores dq
    [B, H, N, D] (q's dtype) once. The bars' dk/dv contributions are atomically added to DK, DV (float32 [B, Hk, N,
    D], already holding the tiles' part from `_sparse_dkdv_kernel`): a bar column is shared by many query blocks
    and heads, but a query block has only a few.
    """
    q_matrix, kv_matrix, layout_row = _program_offsets(seq_len, num_heads, num_kv_heads, num_q_blocks)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    q = _load_rows(Q + q_matrix * HEAD_DIM, rows, row_ok, HEAD_DIM).to(DOT_DTYPE)
    do = _load_rows(DO + q_matrix * HEAD_DIM, rows, row_ok, HEAD_DIM).to(DOT_DTYPE)
    lse2 = tl.load(Lse + q_matrix + rows, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + q_matrix + rows, mask=row_ok, other=0.0)
    k_base, v_base = K + kv_matrix * HEAD_DIM, V + kv_matrix * HEAD_DIM
    dk_base, dv_base = DK + kv_matrix * HEAD_DIM, DV + kv_matrix * HEAD_DIM
    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)

    # (a) active key tiles: dq only (their dk/dv come from the key-major kernel)
    for slot in range(tl.load(BlockCount + layout_row)):
        tile_start = tl.load(BlockIndex + layout_row * max_blocks + slot).to(tl.int64) * BLOCK_M
        for offset in tl.static_range(0, BLOCK_M, BLOCK_N):
            cols = tile_start + offset + tl.arange(0, BLOCK_N)
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, rows, row_ok, cols,
                          cols < seq_len, scale, qk_scale, False, HEAD_DIM, DTYPE, DOT_DTYPE, PRECISION)
    # (b) bar columns: dq, and their dk/dv scattered
    num_columns = tl.load(ColumnCount + layout_row)
    for start in range(0, num_columns, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        col_ok = slots < num_columns
        cols = tl.load(ColumnIndex + layout_row * max_columns + slots, mask=col_ok, other=0).to(tl.int64)
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, rows, row_ok, cols, col_ok,
                      scale, qk_scale, True, HEAD_DIM, DTYPE, DOT_DTYPE, PRECISION)

    dims = tl.arange(0, HEAD_DIM)
    dq_ptrs = DQ + q_matrix * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DTYPE), mask=row_ok[:, None])


@_jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rows, cols, col_ok, seq_len, qk_scale,
               HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Folds the query rows `rows` (one query head) into the keys' dk (unscaled) and dv, transposed orientation:
    S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dS^T = P^T (V dO^T - delta), dK += dS^T Q."""
    row_ok = rows < seq_len
    q = _load_rows(q_base, rows, row_ok, HEAD_DIM).to(DOT_DTYPE)
    do = _load_rows(do_base, rows, row_ok, HEAD_DIM).to(DOT_DTYPE)
    lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    visible = (cols[:, None] <= rows[None, :]) & col_ok[:, None] & row_ok[None, :]
    p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(DTYPE).to(DOT_DTYPE)
    dv += tl.dot(p_t.to(DTYPE).to(DOT_DTYPE), do, input_precision=PRECISION)
    dk += tl.dot(ds_t, q, input_precision=PRECISION)
    return dk, dv


@_jit
def _sparse_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, QueryCount, QueryIndex,
                        seq_len, num_heads, num_kv_heads, num_k_blocks, max_queries, scale, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (num_k_blocks * BLOCK_M // BLOCK_N, Hk, B): dk, dv of BLOCK_N keys (a slice of key block c, G = BLOCK_M
    keys) of one (batch row, key/value head), through the active tiles only.

    Loops over the query heads of the GQA group and, with the key-major layout of each head, over the query blocks
    r whose tile (r, c) is active, STEP_M query rows at a time (the causal mask bites on the diagonal tile r = c);
    dk, dv stay in float32 registers and are stored once into DK, DV (float32 [B, Hk, N, D]; zeros for keys no tile
    reaches). No atomics: every key is owned by one program. The bar columns' part is added afterwards by
    `_sparse_dq_kernel`.
    """
    key_slice, kv_head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_block = key_slice // (BLOCK_M // BLOCK_N)
    cols = key_slice.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # G is a multiple of BLOCK_N
    col_ok = cols < seq_len
    kv_matrix = (batch * num_kv_heads + kv_head).to(tl.int64) * seq_len
    k = _load_rows(K + kv_matrix * HEAD_DIM, cols, col_ok, HEAD_DIM).to(DOT_DTYPE)
    v = _load_rows(V + kv_matrix * HEAD_DIM, cols, col_ok, HEAD_DIM).to(DOT_DTYPE)
    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, dtype=tl.float32)

    group = num_heads // num_kv_heads
    for member in range(group):
        head = (batch * num_heads + kv_head * group + member).to(tl.int64)
        q_matrix = head * seq_len
        layout_row = head * num_k_blocks + k_block
        for slot in range(tl.load(QueryCount + layout_row)):
            block_start = tl.load(QueryIndex + layout_row * max_queries + slot).to(tl.int64) * BLOCK_M
            for offset in tl.static_range(0, BLOCK_M, STEP_M):
                rows = block_start + offset + tl.arange(0, STEP_M)
                dk, dv = _dkdv_step(dk, dv, k, v, Q + q_matrix * HEAD_DIM, DO + q_matrix * HEAD_DIM, Lse + q_matrix,
                                    Delta + q_matrix, rows, cols, col_ok, seq_len, qk_scale,
                                    HEAD_DIM, DTYPE, DOT_DTYPE, PRECISION)

    dims = tl.arange(0, HEAD_DIM)
    key_ptrs = kv_matrix * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DK + key_ptrs, dk * scale, mask=col_ok[:, None])
    tl.store(DV + key_ptrs, dv, mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# host side


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_inputs(q, k, v, layout: BlockLayout, block_n: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, H, N, D] and k, v [B, Hk, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or h % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (need the same B, N, D and "
                         f"H a multiple of Hk)")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not INTERPRET and q.device.type != "cuda":
        raise ValueError("the compiled Triton kernels need CUDA tensors (set TRITON_INTERPRET=1 before importing "
                         "reasonrl.kernels.triton_sparse to run them on CPU, slowly)")
    if not _is_power_of_two(d) or d < 16:
        raise ValueError(f"head dim D must be a power of two >= 16 for the Triton kernels (tl.arange / tl.dot "
                         f"shapes), got D = {d}; zero-pad q, k, v to the next power of two, pass scale={d}**-0.5 and "
                         f"slice the output")
    g = layout.block_size
    if not _is_power_of_two(g) or g < 16:
        raise ValueError(f"layout.block_size must be a power of two >= 16 for the Triton kernels, got {g}")
    if not _is_power_of_two(block_n) or block_n < 16 or g % block_n:
        raise ValueError(f"block_n must be a power of two >= 16 dividing block_size {g}, got {block_n}")
    if layout.seq_len != n or tuple(layout.block_count.shape) != (b, h, -(-n // g)):
        raise ValueError(f"layout (B, H, blocks) = {tuple(layout.block_count.shape)}, seq_len {layout.seq_len} "
                         f"does not match q {tuple(q.shape)} with block_size {g}")


def _int32_tensors(tensors, device) -> list[torch.Tensor]:
    """Layout tensors as contiguous int32 on `device`."""
    return [t.to(device=device, dtype=torch.int32).contiguous() for t in tensors]


def _layout_tensors(layout: BlockLayout, device) -> list[torch.Tensor]:
    """block_count, block_index, column_count, column_index as contiguous int32 on `device`."""
    return _int32_tensors((layout.block_count, layout.block_index, layout.column_count, layout.column_index), device)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _numerics(dtype: torch.dtype) -> dict:
    """The kernels' dtype constexprs for inputs of `dtype`.

    DTYPE: the inputs' and outputs' type; P and dS are rounded to it before their matmuls, as in FlashAttention.
    DOT_DTYPE: the tl.dot operand type, DTYPE except bf16 in the interpreter: Triton 3.9's interpreter multiplies
    bf16 operands as their raw uint16 bits (numpy has no bfloat16), so there the bf16 values (exact in fp32) are
    converted to fp32 first; the products and fp32 accumulation are the same as a bf16 tensor-core dot.
    PRECISION: "ieee" for fp32 inputs (no silent TF32 on GPU), Triton's default otherwise.
    """
    bf16_in_fp32 = INTERPRET and dtype == torch.bfloat16
    return {"DTYPE": _TRITON_DTYPES[dtype], "DOT_DTYPE": tl.float32 if bf16_in_fp32 else _TRITON_DTYPES[dtype],
            "PRECISION": "ieee" if dtype == torch.float32 else None}


# Launch settings per kernel (Triton's defaults for what is absent, e.g. num_stages), and the query rows per step of
# the dk/dv kernel (None: block_n; a power of two >= 16 dividing block_size). Module-level so that a profile can try
# others; they change speed and shared memory use, not results (beyond float summation order).
LAUNCH = {"forward": {"num_warps": 4}, "dq": {"num_warps": 4}, "dkdv": {"num_warps": 4}}
DKDV_QUERY_STEP: int | None = None


def _launch_args(q, k, layout: BlockLayout, block_n: int):
    """Grid, shape scalars (after the tensor arguments) and constexprs of the query-major (forward, dq) kernels."""
    b, h, n, d = q.shape
    num_q_blocks = layout.block_count.shape[-1]
    grid = (num_q_blocks, h, b)
    scalars = (n, h, k.shape[1], num_q_blocks, layout.block_index.shape[-1], layout.column_index.shape[-1])
    constexprs = {"BLOCK_M": layout.block_size, "BLOCK_N": block_n, "HEAD_DIM": d, **_numerics(q.dtype)}
    return grid, scalars, constexprs


def _forward(q, k, v, layout: BlockLayout, scale: float, block_n: int):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    grid, scalars, constexprs = _launch_args(q, k, layout, block_n)
    _sparse_forward_kernel[grid](q, k, v, out, lse, *_layout_tensors(layout, q.device), *scalars,
                                 scale * math.log2(math.e), **constexprs, **LAUNCH["forward"])
    return out, lse


def _backward(q, k, v, out, lse, grad_out, grad_lse, layout: BlockLayout, scale: float, block_n: int):
    """dq, dk, dv: the key-major kernel stores the tiles' dk/dv into float32 buffers, then the query-major kernel
    computes dq and adds the bar columns' dk/dv to those buffers (so it must run second)."""
    delta = (grad_out.float() * out.float()).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    grid, scalars, constexprs = _launch_args(q, k, layout, block_n)
    qk_scale = scale * math.log2(math.e)

    key_major = layout.key_major()
    query_count, query_index = _int32_tensors((key_major.query_count, key_major.query_index), q.device)
    (b, h, n, _), num_kv_heads, num_blocks = q.shape, k.shape[1], grid[0]
    key_grid = (num_blocks * (layout.block_size // block_n), num_kv_heads, b)
    step_m = min(DKDV_QUERY_STEP or block_n, layout.block_size)
    _sparse_dkdv_kernel[key_grid](q, k, v, grad_out, lse, delta, dk, dv, query_count, query_index,
                                  n, h, num_kv_heads, num_blocks, query_index.shape[-1], scale, qk_scale,
                                  STEP_M=step_m, **constexprs, **LAUNCH["dkdv"])
    _sparse_dq_kernel[grid](q, k, v, grad_out, lse, delta, dq, dk, dv, *_layout_tensors(layout, q.device), *scalars,
                            scale, qk_scale, **constexprs, **LAUNCH["dq"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, block_n):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _forward(q, k, v, layout, scale, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.block_n = layout, scale, block_n
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, grad_lse, ctx.layout, ctx.scale, ctx.block_n)
        return dq, dk, dv, None, None, None


def triton_sparse_attention(q, k, v, layout: BlockLayout, scale: float | None = None, return_lse: bool = False,
                            block_n: int | None = None):
    """Sparse causal attention of q [B, H, N, D] against k, v [B, Hk, N, D] (H a multiple of Hk) over `layout`.

    Same result as `reference_sparse_attention` with the layout's pattern; differentiable in q, k, v (and through
    lse when returned). Returns out [B, H, N, D] in q's dtype, and lse [B, H, N] float32 (natural log) when
    `return_lse`. fp32, fp16, bf16 inputs; softmax statistics and accumulators are float32. Constraints: D and
    `layout.block_size` (G) powers of two >= 16; `block_n` (keys per inner step, and keys per program of the dk/dv
    kernel; default min(G, 64), min(G, 32) for fp32) a power of two >= 16 dividing G. Non-contiguous inputs are
    copied to contiguous ones.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if block_n is None:  # fp32 doubles shared memory: G = 64, D = 128, 64-key steps need 224 KiB in the backward
        block_n = min(layout.block_size, 32 if q.dtype == torch.float32 else 64)
    _check_inputs(q, k, v, layout, block_n)
    out, lse = _SparseAttention.apply(q, k, v, layout, scale, block_n)
    return (out, lse) if return_lse else out
