"""Vertical-slash sparse attention patterns (MTraining / MInference): what they mean and how they are estimated.

A pattern keeps, per (batch row, query head):
- **vertical** columns: key positions that every later query may attend to (attention sinks, anchor tokens);
- **slash** diagonals: offsets d = q_pos - k_pos, kept at tile granularity. With tiles of G = `block_size` tokens,
  the tile (query block a, key block b) is active iff `slash_blocks[a - b]`. A kept offset d activates the tile
  distances floor(d / G) and, when G does not divide d, floor(d / G) + 1 (the two tiles the diagonal crosses).
  Distance 0 (the causal diagonal tile) is always active, so no query is left without keys.

Query i may attend to key j iff j <= i and (tile(i // G, j // G) is active or j is a vertical column). This is the
set every implementation (reference, Triton, ring) computes; `pattern_mask` builds it densely for tests.

Estimation (every forward, no gradient): the last `last_q` queries score all keys; vertical score = column sums,
slash score = diagonal sums; the top-k (or the smallest set holding `mass` of the probability) is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ESTIMATION_MODES = ("topk", "mass")
NORMALIZATIONS = ("softmax", "logits")


@dataclass(frozen=True)
class PatternConfig:
    """How a vertical-slash pattern is estimated. Defaults follow the released MTraining code (G = 128)."""

    block_size: int = 128
    last_q: int = 64
    mode: str = "topk"
    vertical_size: int = 1000
    slash_size: int = 6096
    sink: int = 30
    local_window: int = 100
    mass: float = 0.9
    max_vertical: int = 4096
    max_slash: int = 4096
    normalize: str = "softmax"

    def __post_init__(self):
        if self.mode not in ESTIMATION_MODES:
            raise ValueError(f"pattern mode must be one of {ESTIMATION_MODES}, got {self.mode!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"pattern normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.block_size < 1 or self.last_q < 1:
            raise ValueError("block_size and last_q must be >= 1")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"pattern mass must be in (0, 1], got {self.mass}")


@dataclass
class SparsePattern:
    """vertical: bool [B, H, N]; slash_blocks: bool [B, H, ceil(N / block_size)] indexed by tile distance a - b."""

    vertical: torch.Tensor
    slash_blocks: torch.Tensor
    block_size: int

    def __post_init__(self):
        if not bool(self.slash_blocks[..., 0].all()):
            raise ValueError("slash_blocks[..., 0] (the causal diagonal tile) must be kept in every pattern")

    @property
    def seq_len(self) -> int:
        return self.vertical.shape[-1]

    @property
    def num_blocks(self) -> int:
        return self.slash_blocks.shape[-1]


def num_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)


def positions(n: int, device=None) -> torch.Tensor:
    return torch.arange(n, device=device)


def _gqa_groups(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per key/value head (query head h reads kv head h // groups)."""
    groups = num_heads // num_kv_heads
    if groups * num_kv_heads != num_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    return groups


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hk, N, D] -> [B, H, N, D] for grouped-query attention (query head h reads kv head h // (H / Hk))."""
    groups = _gqa_groups(num_heads, x.shape[1])
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def slash_offsets_to_blocks(slash: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [..., N] over offsets d -> bool [..., ceil(N / G)] over tile distances (distance 0 always active)."""
    n = slash.shape[-1]
    blocks = num_blocks(n, block_size)
    offsets = torch.arange(n, device=slash.device)
    low = offsets // block_size
    high = torch.where(offsets % block_size == 0, low, low + 1).clamp(max=blocks - 1)
    kept = slash.to(torch.int32)
    out = torch.zeros(*slash.shape[:-1], blocks, dtype=torch.int32, device=slash.device)
    out.scatter_add_(-1, low.expand_as(kept), kept)
    out.scatter_add_(-1, high.expand_as(kept), kept)
    out[..., 0] = 1
    return out > 0


def pattern_mask(pattern: SparsePattern, q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None):
    """Dense bool mask [B, H, len(q_pos), len(k_pos)] of the (query, key) pairs the pattern keeps, causal included.

    `q_pos` / `k_pos` are global token positions (default: the whole sequence); a ring rank passes its own chunks.
    """
    device = pattern.vertical.device
    q_pos = positions(pattern.seq_len, device) if q_pos is None else q_pos.to(device)
    k_pos = positions(pattern.seq_len, device) if k_pos is None else k_pos.to(device)
    g = pattern.block_size
    causal = k_pos[None, :] <= q_pos[:, None]
    distance = (q_pos[:, None] // g - k_pos[None, :] // g).clamp(min=0, max=pattern.num_blocks - 1)
    b, h, _ = pattern.slash_blocks.shape
    tiles = pattern.slash_blocks.gather(-1, distance.reshape(1, 1, -1).expand(b, h, -1))
    tiles = tiles.view(b, h, len(q_pos), len(k_pos))
    vertical = pattern.vertical[..., k_pos][:, :, None, :]
    return causal & (tiles | vertical)


@torch.no_grad()
def last_query_logits(q_last, k, q_pos, k_pos, scale: float) -> torch.Tensor:
    """Scaled logits [B, H, m, n] of the last m queries against keys at `k_pos`; -inf where causally hidden."""
    k = repeat_kv(k, q_last.shape[1])
    logits = torch.matmul(q_last.float(), k.float().transpose(-1, -2)) * scale
    hidden = k_pos.to(logits.device)[None, :] > q_pos.to(logits.device)[:, None]
    return logits.masked_fill(hidden, float("-inf"))


@torch.no_grad()
def partial_scores(logits, q_pos, k_pos, seq_len: int, normalize: str, row_lse: torch.Tensor | None = None):
    """Vertical and slash scores [B, H, seq_len] contributed by the keys at `k_pos` (zeros elsewhere).

    softmax: probabilities exp(logit - row_lse), with row_lse the logsumexp over *all* keys (pass it when the keys
    are split across ranks; default: over these keys). logits: raw scaled logits, hidden ones counted as 0.
    """
    if normalize == "softmax":
        lse = torch.logsumexp(logits, dim=-1) if row_lse is None else row_lse
        weights = torch.exp(logits - lse[..., None])
    else:
        weights = logits
    weights = torch.nan_to_num(weights.masked_fill(torch.isinf(logits), 0.0), nan=0.0)
    b, h, _, _ = weights.shape
    device = weights.device
    k_pos, q_pos = k_pos.to(device), q_pos.to(device)
    vertical = torch.zeros(b, h, seq_len, device=device)
    vertical.index_add_(-1, k_pos, weights.sum(dim=2))
    offsets = (q_pos[:, None] - k_pos[None, :]).clamp(min=0)
    slash = torch.zeros(b, h, seq_len, device=device)
    slash.index_add_(-1, offsets.reshape(-1), weights.reshape(b, h, -1))
    return vertical, slash


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = max(0, min(k, scores.shape[-1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)  # the set, in any order
    return mask


def _mass_mask(scores: torch.Tensor, mass: float, cap: int) -> torch.Tensor:
    """Smallest top set whose share of the total score reaches `mass` (at least 1 entry, at most `cap`)."""
    total = scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    ordered, order = (scores / total).sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered
    keep_sorted = (before < mass) & (torch.arange(scores.shape[-1], device=scores.device) < cap)
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@torch.no_grad()
def select_pattern(vertical_scores, slash_scores, config: PatternConfig) -> SparsePattern:
    """Keep the best columns and diagonals. topk: sinks and the local window are forced in; mass: nothing forced."""
    if config.mode == "topk":
        vertical_scores = vertical_scores.clone()
        slash_scores = slash_scores.clone()
        vertical_scores[..., : config.sink] = float("inf")
        slash_scores[..., : config.local_window] = float("inf")
        vertical = _topk_mask(vertical_scores, config.vertical_size)
        slash = _topk_mask(slash_scores, config.slash_size)
    else:
        vertical = _mass_mask(vertical_scores.clamp(min=0), config.mass, config.max_vertical)
        slash = _mass_mask(slash_scores.clamp(min=0), config.mass, config.max_slash)
    return SparsePattern(vertical, slash_offsets_to_blocks(slash, config.block_size), config.block_size)


def _last_rows_logits(q, k, m: int, scale: float) -> torch.Tensor:
    """What `last_query_logits` gives for the last m queries against all N keys (float32 [B, H, m, N], -inf where
    hidden), cheaper: the query heads of a GQA group share their key head in one matmul (no repeated keys), the
    scaling is in place, and only the last m key columns (the only ones a last query can fail to see) are masked."""
    b, h, n, d = q.shape
    num_kv_heads = k.shape[1]
    groups = _gqa_groups(h, num_kv_heads)
    q_last = q[:, :, n - m :].float().reshape(b, num_kv_heads, groups * m, d)
    logits = torch.matmul(q_last, k.float().transpose(-1, -2)).view(b, h, m, n).mul_(scale)
    rows = torch.arange(m, device=q.device)
    logits[..., n - m :].masked_fill_(rows[None, :] > rows[:, None], float("-inf"))  # key n-m+c hidden from row i<c
    return logits


def _weights_(logits: torch.Tensor, normalize: str) -> torch.Tensor:
    """`partial_scores`' weights, computed in place in `logits` (returned): softmax probabilities exp(logit - lse)
    (0 where hidden; finite logits assumed, as they are for finite q, k), or the logits with -inf / nan set to 0."""
    if normalize == "softmax":
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        return logits.sub_(lse).exp_()
    return logits.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def diagonal_sums(weights: torch.Tensor) -> torch.Tensor:
    """Slash scores [B, H, N] of the last m queries' weights [B, H, m, N] (zero where hidden): entry d sums
    weights[..., i, N - m + i - d] over the rows i that reach that far back (what `partial_scores` gets by index_add).

    Offsets d <= N - m are reached by every row: in the contiguous rows, element (i, i + t) lies i * (N + 1) + t
    elements in, so a view with row stride N + 1 lines the diagonals up in columns t = N - m - d and one sum over
    rows gives them all. The last m - 1 offsets come from the pairs j < i of the leading [m, m] block (small)."""
    b, h, m, n = weights.shape
    weights = weights.contiguous()
    strides = (weights.stride(0), weights.stride(1), n + 1, 1)
    by_diagonal = weights.as_strided((b, h, m, n - m + 1), strides, weights.storage_offset())
    reached_by_all = by_diagonal.sum(dim=2).flip(-1)  # offsets 0 .. N - m
    i, j = torch.tril_indices(m, m, offset=-1, device=weights.device)  # the pairs j < i: offset N - m + (i - j)
    tail = torch.zeros(b, h, m, dtype=weights.dtype, device=weights.device)
    tail.index_add_(-1, i - j, weights[..., i, j])
    return torch.cat([reached_by_all, tail[..., 1:]], dim=-1)  # offsets N - m + 1 .. N - 1


@torch.no_grad()
def last_query_scores(q, k, m: int, scale: float, normalize: str):
    """Vertical and slash scores [B, H, N] of the last m queries against all N keys (q [B, H, N, D], k [B, Hk, N, D]):
    `partial_scores(last_query_logits(...), ...)` up to float summation order, with one [B, H, m, N] float32 buffer
    worked in place: no repeated keys, no masks or copies of the full buffer, the diagonal sums by a strided view
    instead of a scatter."""
    weights = _weights_(_last_rows_logits(q, k, m, scale), normalize)
    return weights.sum(dim=2), diagonal_sums(weights)


@torch.no_grad()
def estimate_pattern(q, k, config: PatternConfig, scale: float | None = None) -> SparsePattern:
    """Pattern of one batch of equal-length sequences. q [B, H, N, D], k [B, Hk, N, D]."""
    n = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    vertical, slash = last_query_scores(q, k, min(config.last_q, n), scale, config.normalize)
    return select_pattern(vertical, slash, config)


def dense_pattern(batch: int, heads: int, seq_len: int, block_size: int, device=None) -> SparsePattern:
    """The all-keep pattern (every causal pair): sparse attention with it equals dense causal attention."""
    blocks = num_blocks(seq_len, block_size)
    return SparsePattern(
        torch.ones(batch, heads, seq_len, dtype=torch.bool, device=device),
        torch.ones(batch, heads, blocks, dtype=torch.bool, device=device),
        block_size,
    )
