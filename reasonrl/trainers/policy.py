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
    """log pi(y_t | x, y_<t) / tau-tempered, and the entropy of that distribution, both [B, T].

    Layout: [left-padded prompt | right-padded completion]; position ids count real tokens only, matching
    `generate` with left padding. The LM head runs on the completion positions only, and the log-softmax in
    chunks, so no [B, P+T, V] or full float32 [B, T, V] log-softmax is kept.
    """
    device = completion_ids.device
    p_ids, p_mask = pack_prompts_left(prompt_ids, pad_id)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    c_ids = completion_ids.masked_fill(~completion_mask.bool(), pad_id)
    input_ids = torch.cat([p_ids, c_ids], dim=1)
    attention = torch.cat([p_mask, completion_mask.long()], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    steps = completion_ids.shape[1]
    # The last T+1 positions start at the last prompt token; dropping the final one leaves the positions that
    # predict y_0 .. y_{T-1}. Calling the (possibly DDP-wrapped) model itself keeps gradient sync hooks intact.
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, logits_to_keep=steps + 1)
    logits = out.logits[:, :-1]
    return token_logprobs_and_entropy(logits, c_ids, temperature=temperature, chunk_size=chunk_size)
