import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.trainers.policy import (
    completion_logprobs,
    full_sequence_completion_logprobs,
    packed_completion_logprobs,
    unique_prompts,
)


def test_unique_prompts_maps_rows_to_first_seen_prompts():
    prompts, rows = unique_prompts([[1, 2], [1, 2], [3], [1, 2], [3]])
    assert prompts == [[1, 2], [3]] and rows.tolist() == [0, 0, 1, 0, 1]


def test_shared_prompt_forward_equals_one_sequence_at_a_time():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7]]
    completions = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0], [7, 8, 9]])
    mask = completions != 0
    logp, ent = completion_logprobs(model, prompts, completions, mask, pad_id=0, temperature=0.5)
    for i, prompt in enumerate(prompts):
        n = int(mask[i].sum())
        seq = torch.tensor([prompt + completions[i, :n].tolist()])
        logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits / 0.5, -1)  # log-probs at the training temperature
        torch.testing.assert_close(logp[i, :n], ref.gather(-1, seq[0, len(prompt) :, None]).squeeze(-1), atol=1e-5,
                                   rtol=1e-5)
        at_one = torch.log_softmax(logits, -1)  # entropy at T = 1, the spec's H, whatever the temperature
        torch.testing.assert_close(ent[i, :n], -(at_one.exp() * at_one).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("forward", [completion_logprobs, packed_completion_logprobs, full_sequence_completion_logprobs])
def test_every_forward_gives_logprobs_at_the_temperature_and_entropies_at_one(forward):
    """HAPO, D3S and RMT read the spec's H (T = 1) whichever forward the trainer runs, and whatever rollout.temperature
    is; the log-probs stay those of the tempered policy (rollout/base.py)."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    prompts, completions = [[5, 6, 7], [8, 9]], torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = completions != 0
    cold, cold_ent = forward(model, prompts, completions, mask, pad_id=0, temperature=0.6)
    warm, warm_ent = forward(model, prompts, completions, mask, pad_id=0, temperature=1.0)
    torch.testing.assert_close(cold_ent[mask], warm_ent[mask], atol=1e-6, rtol=1e-6)
    assert (cold[mask] - warm[mask]).abs().max() > 1e-3
