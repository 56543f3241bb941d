"""Teacher-forced log-probs of completions under a causal LM, computing logits only where they are needed."""

from __future__ import annotations

import torch

from reasonrl.rl.losses import LOGPROB_CHUNK_ROWS, token_logprobs_and_entropy


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float, chunk_size: int = LOGPROB_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] log-probs of ``targets`` under softmax(logits / temperature) (what the policy-gradient ratio and the KL
    read), and the entropy H_t of softmax(logits) at T = 1 (the spec's H, algorithms.md "Notation": HAPO, D3S and RMT
    read it, and the hf engine returns the same), whatever the training temperature.

    At T = 1 both come from one chunked pass; otherwise the entropy takes a second pass over the same logits (no
    copy: both passes save the same tensor for backward)."""
    logp, entropy = token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk_size)
    if temperature != 1.0:
        _, entropy = token_logprobs_and_entropy(logits, targets, temperature=1.0, chunk_size=chunk_size)
    return logp, entropy


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
    chunk_size: int = LOGPROB_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of the tau-tempered policy and the policy's entropy at T = 1, both [B, T]
    (`logprobs_and_entropy`).

    GRPO rows share prompts (G samples each), so each distinct prompt runs through the model once; its KV cache is
    then indexed per row (a differentiable gather, so gradients through the prompt are exact) and the completions
    run on top of it. On the default task this halves the training FLOPs. Prompts are left-padded and position ids
    count real tokens only, matching `generate`. The LM head runs on completion positions only and the
    log-softmax in chunks, so no [B, P+T, V] logits or full float32 [B, T, V] log-softmax is kept.

    Gradient checkpointing in training mode makes transformers drop the KV cache, so there this delegates to
    `full_sequence_completion_logprobs`, which needs none.
    """
    core = getattr(model, "module", model)
    if core.training and getattr(core, "is_gradient_checkpointing", False):
        return full_sequence_completion_logprobs(model, prompt_ids, completion_ids, completion_mask, pad_id=pad_id,
                                                 temperature=temperature, chunk_size=chunk_size)
    device = completion_ids.device
    prompts, row_prompt = unique_prompts(prompt_ids)
    p_ids, p_mask = (t.to(device) for t in pack_prompts_left(prompts, pad_id))
    row_prompt = row_prompt.to(device)
    # The prompt pass goes through the bare module: a DDP wrapper expects one forward per backward, and the
    # completion pass below (through the wrapper) already covers every parameter via the cache.
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
    return logprobs_and_entropy(logits, c_ids, temperature=temperature, chunk_size=chunk_size)


def packed_completion_logprobs(
    model,
    prompt_ids: list[list[int]],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    pad_id: int,
    temperature: float = 1.0,
    chunk_size: int = LOGPROB_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logprobs` without padding: the same [B, T] log-probs and entropies (zeros where the mask is 0).

    Every row's prompt and real completion tokens (right-padded completions: the mask is a prefix) are concatenated
    into ONE row [1, L] with position ids restarting at 0 per sequence and no attention mask, so transformers builds a
    block-diagonal causal mask (masking_utils.find_packed_sequence_indices for sdpa/eager/flex; flash-attention reads
    the sequence starts from the position ids). No pad token is computed, and no KV cache is used, so this also works
    under gradient checkpointing (which drops the cache in training mode). Each row's last token is not fed: its
    output predicts nothing we score. The LM head runs only at the positions that predict completion tokens
    (`logits_to_keep` as an index tensor). Unlike `completion_logprobs`, a prompt shared by G rows runs G times.
    `pad_id` is unused (kept for the same signature).

    Attention cost: flash-attention runs the sequences as variable-length batches (no mask); sdpa and eager get an
    [L, L] block-diagonal mask, quadratic in the packed length L, so keep micro-batches small there (see
    docs/scale_out.md, Memory).
    """
    del pad_id
    device = completion_ids.device
    b, t = completion_ids.shape
    mask = completion_mask.bool()
    keep = mask
    if not bool(mask.any()):  # an all-empty micro-batch still runs one token per row, so backward has a graph
        keep = mask.clone()
        keep[:, 0] = True
    counts = keep.sum(-1).tolist()
    tokens, positions, predictors, targets = [], [], [], []
    offset = 0
    for i, prompt in enumerate(prompt_ids):
        n = counts[i]
        if n == 0:
            continue
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt: its first completion token has no predictor")
        completion = completion_ids[i][keep[i]]
        seq = torch.cat([torch.as_tensor(prompt, dtype=torch.long, device=device), completion[:-1]])
        tokens.append(seq)
        positions.append(torch.arange(seq.numel(), device=device))
        predictors.append(offset + len(prompt) - 1 + torch.arange(n, device=device))
        targets.append(completion)
        offset += seq.numel()
    out = model(input_ids=torch.cat(tokens)[None], position_ids=torch.cat(positions)[None], use_cache=False,
                logits_to_keep=torch.cat(predictors))
    logp, ent = logprobs_and_entropy(out.logits, torch.cat(targets)[None], temperature=temperature,
                                     chunk_size=chunk_size)
    full_logp = torch.zeros(b, t, dtype=logp.dtype, device=device).masked_scatter(keep, logp[0])
    full_ent = torch.zeros(b, t, dtype=ent.dtype, device=device).masked_scatter(keep, ent[0])
    if keep is not mask:  # the dummy tokens: zero values, but still connected to the graph
        full_logp, full_ent = full_logp * 0, full_ent * 0
    return full_logp, full_ent


def full_sequence_completion_logprobs(
    model,
    prompt_ids: list[list[int]],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    pad_id: int,
    temperature: float = 1.0,
    chunk_size: int = LOGPROB_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logprobs` without the shared-prompt KV cache: each row runs as one padded sequence (left-padded
    prompt, then its completion), as gradient checkpointing needs (transformers drops the cache under it).

    Position ids count real tokens only, as in `completion_logprobs`. The last completion column is not fed (its
    output predicts nothing we score), so the last T positions are exactly those that predict the T completion
    tokens and the LM head runs there only (`logits_to_keep=T`).
    """
    device = completion_ids.device
    p_ids, p_mask = (x.to(device) for x in pack_prompts_left(prompt_ids, pad_id))
    c_mask = completion_mask.bool()
    c_ids = completion_ids.masked_fill(~c_mask, pad_id)
    width = c_ids.shape[1]
    start = p_mask.sum(-1, keepdim=True)
    positions = torch.cat([(p_mask.cumsum(-1) - 1).clamp(min=0), start + torch.arange(width - 1, device=device)], 1)
    out = model(input_ids=torch.cat([p_ids, c_ids[:, :-1]], 1), attention_mask=torch.cat([p_mask, c_mask[:, :-1]], 1),
                position_ids=positions, use_cache=False, logits_to_keep=width)
    return logprobs_and_entropy(out.logits, c_ids, temperature=temperature, chunk_size=chunk_size)
