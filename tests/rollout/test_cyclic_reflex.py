"""CyclicReflex: the triangular wave by hand, the processor against a naive loop, and its effect in generation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.cyclic_reflex import (
    CyclicReflexLogitsProcessor,
    reflection_token_ids,
    reflex_bias,
    triangular_wave,
)
from reasonrl.rollout.hf import HFEngine


@pytest.mark.parametrize("p, shift, expected", [
    (0, 0.0, 0.0), (1, 0.0, 1.0), (2, 0.0, 2.0), (3, 0.0, 1.0), (4, 0.0, 0.0), (5, 0.0, -1.0), (6, 0.0, -2.0),
    (7, 0.0, -1.0), (8, 0.0, 0.0), (10, 0.0, 2.0), (0, 0.25, 2.0), (2, 0.5, -2.0),
])
def test_triangular_wave_by_hand(p, shift, expected):  # A = 2, P = 8: +A at P/4, -A at 3P/4
    assert triangular_wave(p, amplitude=2.0, period=8, shift=shift) == pytest.approx(expected)


def test_wave_is_zero_mean_over_a_period_and_rejects_a_bad_period():
    assert sum(triangular_wave(p, amplitude=3.0, period=12) for p in range(12)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="period"):
        triangular_wave(0, amplitude=1.0, period=0)


def test_bias_stops_after_think_end_and_outside_windows():
    assert reflex_bias([5, 5], amplitude=2.0, period=8) == pytest.approx(2.0)
    assert reflex_bias([5, 9], amplitude=2.0, period=8, think_end_id=9) == 0.0  # thinking is over
    assert reflex_bias([5, 5], amplitude=2.0, period=8, windows=[(3, 10)]) == 0.0
    assert reflex_bias([5, 5, 5], amplitude=2.0, period=8, windows=[(3, 10)]) == pytest.approx(1.0)


def test_processor_matches_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    prompt_width, vocab, reflection = 3, 11, [2, 7]
    input_ids = torch.randint(0, vocab, (4, prompt_width + 5), generator=gen)
    input_ids[1, prompt_width + 2] = 9  # row 1 ended its thinking
    scores = torch.randn(4, vocab, generator=gen)
    proc = CyclicReflexLogitsProcessor(reflection, amplitude=1.5, period=6, shift=0.1, think_end_id=9,
                                       prompt_width=prompt_width)
    out = proc(input_ids, scores)
    for b in range(4):
        generated = input_ids[b, prompt_width:].tolist()
        thinking = 9 not in generated
        for v in range(vocab):
            expected = scores[b, v].item()
            if v in reflection and thinking:
                expected += triangular_wave(len(generated), amplitude=1.5, period=6, shift=0.1)
            assert out[b, v].item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(scores, scores.clone())  # the input is not modified in place


def test_reflection_ids_are_exact_vocabulary_entries():
    vocab = {"wait": 5, "But": 8}

    class Tok:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return vocab.get(token, self.unk_token_id)

    assert reflection_token_ids(Tok()) == [5, 8]


def test_greedy_generation_follows_the_wave():
    """With a huge amplitude the reflection token wins exactly where the wave is positive and never where it is
    negative."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1,
                                         pad_token_id=0)).eval()
    engine = HFEngine(model, pad_token_id=0, eos_token_ids=[1])
    reflection, period = 17, 8
    proc = CyclicReflexLogitsProcessor([reflection], amplitude=1e4, period=period)
    out = engine.generate([[5, 6, 7]], SamplingParams(n=1, temperature=0.0), [16], logits_processors=[proc])
    ids = out.completion_ids[0]
    assert len(ids) == 16
    for p, token in enumerate(ids):
        delta = triangular_wave(p, amplitude=1e4, period=period)
        if delta > 0:
            assert token == reflection, (p, ids)
        elif delta < 0:
            assert token != reflection, (p, ids)
