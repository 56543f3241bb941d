"""Dynamic sparse attention as a transformers attention implementation: `attn_implementation="reasonrl_sparse"`.

Any transformers model that dispatches attention through `AttentionInterface` (Llama, Qwen2/3, Mistral, SmolLM2, ...)
uses it. Settings live on the model config (`model.config.reasonrl_sparse_attention`, a flat dict of
`SparseAttentionConfig` and `PatternConfig` fields), so two models in one process can differ.

The mask hook is the flash-attention one: the attention function receives the 2-D padding mask (or None) and the
position ids, and runs each sequence (padded rows, or packed rows whose position ids restart at 0) on its own.
Calls with a KV cache (fewer queries than keys: decoding, or a completion appended to a cached prompt) run dense
SDPA; the pattern is estimated only when queries and keys are the same tokens. Inside a sequence-parallel forward
(`reasonrl.kernels.context.ring_forward`) q / k / v are this rank's striped share and the sparse ring runs.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from reasonrl.kernels.attention import SparseAttentionConfig, varlen_sparse_attention
from reasonrl.kernels.context import RingContext, active_ring
from reasonrl.kernels.pattern import PatternConfig, dense_pattern, repeat_kv

ATTN_IMPLEMENTATION = "reasonrl_sparse"
CONFIG_ATTRIBUTE = "reasonrl_sparse_attention"


def sparse_config_from_settings(settings: dict | None) -> SparseAttentionConfig:
    """Flat settings (as in a recipe's `model.sparse_attention`) -> SparseAttentionConfig. Unknown keys raise."""
    settings = dict(settings or {})
    pattern_keys = {f.name for f in fields(PatternConfig)}
    top_keys = {f.name for f in fields(SparseAttentionConfig)} - {"pattern"}
    unknown = set(settings) - pattern_keys - top_keys - {"sequence_parallel", "ring", "local_world_size"}
    if unknown:
        raise ValueError(f"unknown sparse attention settings {sorted(unknown)}; valid: "
                         f"{sorted(pattern_keys | top_keys)}")
    pattern = PatternConfig(**{k: v for k, v in settings.items() if k in pattern_keys})
    return SparseAttentionConfig(pattern=pattern, **{k: v for k, v in settings.items() if k in top_keys})


def _cached_dense_attention(query, key, value, padding_mask, scaling):
    """Queries are the last q tokens of kv keys (KV cache): causal with that offset, padded keys hidden."""
    q_len, kv_len = query.shape[2], key.shape[2]
    key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
    allowed = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, -kv_len:].bool()[:, None, None, :]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)


def _ring_attention(query, key, value, config: SparseAttentionConfig, scaling, ring: RingContext):
    """This rank's striped share of one sequence (a sequence-parallel forward): sparse ring attention over the group.
    Below `dense_below` real tokens the all-keep pattern makes it exact dense attention."""
    from reasonrl.kernels.ring import estimate_pattern_distributed, ring_sparse_attention

    if ring.valid_len < config.dense_below:
        world = torch.distributed.get_world_size(ring.group)
        pattern = dense_pattern(query.shape[0], query.shape[1], query.shape[2] * world, config.pattern.block_size,
                                query.device)
    else:
        pattern = estimate_pattern_distributed(query.detach(), key.detach(), config.pattern, ring.group, scaling,
                                               valid_len=ring.valid_len)
    return ring_sparse_attention(query, key, value, pattern, ring.group, scaling, hierarchical=ring.hierarchical,
                                 local_world_size=ring.local_world_size)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: [B, H, N, D] inputs -> ([B, N, H, D] output, no weights)."""
    if dropout:
        raise ValueError("reasonrl_sparse attention does not implement attention dropout; set it to 0")
    config = getattr(module.config, CONFIG_ATTRIBUTE, None)
    config = config if isinstance(config, SparseAttentionConfig) else sparse_config_from_settings(config)
    ring = active_ring()
    if query.shape[2] != key.shape[2]:
        out = _cached_dense_attention(query, key, value, attention_mask, scaling)
    elif ring is not None:
        out = _ring_attention(query, key, value, config, scaling, ring)
    else:
        out = varlen_sparse_attention(query, key, value, config, scaling, padding_mask=attention_mask,
                                      position_ids=kwargs.get("position_ids"))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="reasonrl_sparse"` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION


def configure_model(model, settings: dict | None) -> None:
    """Validate the settings and attach them to the model's config (read by every attention layer)."""
    sparse_config_from_settings(settings)
    setattr(model.config, CONFIG_ATTRIBUTE, dict(settings or {}))
