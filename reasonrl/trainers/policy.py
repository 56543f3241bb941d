"""Teacher-forced log-probs of completions under a causal LM, computing logits only where they are needed."""

from __future__ import annotations

import torch

from reasonrl.rl.losses import token_logprobs_and_entropy


def pack_prompts_left(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one width, as the engines do; returns (ids [B,P], mask [B,P])."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def unique_prompts(prompt_ids: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Distinct prompts (first-seen order) and, per row, the index of its prompt among them."""
    index_of: dict[tuple[int, ...], int] = {}
    rows = []
    for p in prompt_ids:
        rows.append(index_of.setdefault(tuple(p), len(index_of)))
    return [list(p) for p in index_of], torch.tensor(rows, dtype=torch.long)


def completion_logprobs(
    model,
    prompt_ids: list[list[int]],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    pad_id: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of the tau-tempered policy, and that distribution's entropy, both [B, T].

    GRPO rows share prompts (G samples each), so each distinct prompt runs through the model once; its KV cache is
    then indexed per row (a differentiable gather, so gradients through the prompt are exact) and the completions
    run on top of it. On the default task this halves the training FLOPs. Prompts are left-padded and position ids
    count real tokens only, matching `generate`. The LM head runs on completion positions only and the
    log-softmax in chunks, so no [B, P+T, V] logits or full float32 [B, T, V] log-softmax is kept.
    """
    device = completion_ids.device
    prompts, row_prompt = unique_prompts(prompt_ids)
    p_ids, p_mask = (t.to(device) for t in pack_prompts_left(prompts, pad_id))
    row_prompt = row_prompt.to(device)
    # The prompt pass goes through the bare module: a DDP wrapper expects one forward per backward, and the
    # completion pass below (through the wrapper) already covers every parameter via the cache.
    core = getattr(model, "module", model)
    prefix = core(
        input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
        logits_to_keep=1,
    )
    cache = prefix.past_key_values
    cache.reorder_cache(row_prompt)  # [num_prompts, ...] -> [B, ...]
    c_mask = completion_mask.bool()
    c_ids = completion_ids.masked_fill(~c_mask, pad_id)
    attention = torch.cat([p_mask[row_prompt], c_mask.long()], dim=1)
    start = p_mask.sum(-1)[row_prompt]
    positions = start[:, None] + torch.arange(c_ids.shape[1], device=device)[None]
    out = model(input_ids=c_ids, attention_mask=attention, position_ids=positions, past_key_values=cache)
    # logits for y_0 come from the prompt's last position; y_t (t >= 1) from completion position t-1
    logits = torch.cat([prefix.logits[row_prompt, -1:], out.logits[:, :-1]], dim=1)
    return token_logprobs_and_entropy(logits, c_ids, temperature=temperature, chunk_size=chunk_size)
