import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.trainers.policy import completion_logprobs, unique_prompts


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
        logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1] / 0.5
        ref = torch.log_softmax(logits, -1)
        torch.testing.assert_close(logp[i, :n], ref.gather(-1, seq[0, len(prompt) :, None]).squeeze(-1), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(ent[i, :n], -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=1e-5)
