import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.rollout.base import RolloutEngine, SamplingParams
from reasonrl.rollout.hf import HFEngine

EOS, PAD = 1, 0


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def test_engine_meets_protocol_and_budgets():
    engine = HFEngine(tiny_model(), pad_token_id=PAD, eos_token_ids=[EOS])
    assert isinstance(engine, RolloutEngine)
    out = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=3, temperature=1.0, seed=0), [4, 9])
    assert len(out.completion_ids) == 6
    for i, (ids, logp, reason) in enumerate(zip(out.completion_ids, out.logprobs, out.finish_reasons)):
        budget = 4 if i < 3 else 9
        assert len(ids) == len(logp) <= budget
        assert reason == ("stop" if ids[-1] == EOS else "length")
        assert reason == "stop" or len(ids) == budget
        assert all(lp <= 0 for lp in logp)


def test_greedy_logprobs_match_a_teacher_forced_forward():
    model = tiny_model()
    engine = HFEngine(model, pad_token_id=PAD, eos_token_ids=[EOS])
    prompts = [[5, 6, 7], [8, 9]]
    out = engine.generate(prompts, SamplingParams(temperature=0.0), [6, 6])
    for prompt, ids, logp in zip(prompts, out.completion_ids, out.logprobs):
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert ids == logits.argmax(-1).tolist()  # greedy picks the argmax, unaffected by left padding
        torch.testing.assert_close(torch.tensor(logp), expected, atol=1e-4, rtol=1e-4)


def test_seed_makes_sampling_reproducible():
    engine = HFEngine(tiny_model(), pad_token_id=PAD, eos_token_ids=[EOS])
    params = SamplingParams(n=2, temperature=1.0, seed=3)
    a = engine.generate([[5, 6]], params, [8])
    b = engine.generate([[5, 6]], params, [8])
    assert a.completion_ids == b.completion_ids
