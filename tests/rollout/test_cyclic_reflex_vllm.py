"""CyclicReflex in vLLM v1: the settings, the batch-level processor driven by hand against `reflex_bias`, and a real
in-process engine on the tiny model (one engine for the module, ~30-60 s to start on CPU)."""

import json

import pytest
import torch

from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.cyclic_reflex import triangular_wave
from reasonrl.rollout.cyclic_reflex_vllm import (
    EXTRA_ARGS_KEY,
    CyclicReflexSettings,
    request_settings,
    vllm_logits_processor_class,
)

# ---------------------------------------------------------------- settings (no vLLM)


def test_settings_normalise_and_round_trip_through_extra_args():
    settings = CyclicReflexSettings([7, 2, 7], 1.5, 6, shift=0.25, windows=[[0, 10], (20, 30)], think_end_id=9)
    assert settings.token_ids == (2, 7) and settings.windows == ((0, 10), (20, 30))
    extra = settings.to_extra_args()
    assert CyclicReflexSettings.from_extra_args(extra[EXTRA_ARGS_KEY]) == settings
    assert CyclicReflexSettings.from_extra_args(json.dumps(extra[EXTRA_ARGS_KEY])) == settings  # server xargs
    assert hash(CyclicReflexSettings((2, 7), 1.5, 6, 0.25, ((0, 10), (20, 30)), 9)) == hash(settings)
    assert settings.bias([1, 1]) == pytest.approx(triangular_wave(2, amplitude=1.5, period=6, shift=0.25))
    assert settings.bias([1, 9, 1]) == 0.0  # thinking ended


@pytest.mark.parametrize("value, match", [
    ({"token_ids": [], "amplitude": 1.0, "period": 4}, "at least one"),
    ({"token_ids": [1], "amplitude": 1.0, "period": 0}, "period"),
    ({"token_ids": [1], "amplitude": 1.0, "period": 2.5}, "integer"),
    ({"token_ids": [1], "amplitude": 1.0}, "needs"),
    ({"token_ids": [1], "amplitude": 1.0, "period": 4, "colour": 1}, "needs"),
    ({"token_ids": [1], "amplitude": 1.0, "period": 4, "windows": [5]}, "windows"),
    ([1, 2], "must be a dict"),
    ("{not json", "JSON"),
])
def test_bad_extra_args_raise_value_error(value, match):
    with pytest.raises(ValueError, match=match):
        CyclicReflexSettings.from_extra_args(value)


def test_from_tokenizer_keeps_single_token_words_and_finds_think_end():
    vocab = {"wait": 5, "But": 8, "</think>": 3}

    class Tok:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return vocab.get(token, self.unk_token_id)

    settings = CyclicReflexSettings.from_tokenizer(Tok(), amplitude=2.0, period=10)
    assert settings.token_ids == (5, 8) and settings.think_end_id == 3
    assert CyclicReflexSettings.from_tokenizer(Tok(), amplitude=2.0, period=10, think_end="</t>").think_end_id is None
    with pytest.raises(ValueError, match="single token"):
        CyclicReflexSettings.from_tokenizer(Tok(), amplitude=2.0, period=10, words=["hmm"])


# ---------------------------------------------------------------- the vLLM processor, driven by hand


def _expected(logits, rows):
    """The naive reference: reflex_bias of each row's generated ids added to its reflection tokens."""
    out = logits.clone()
    for row, (settings, generated) in rows.items():
        for token in settings.token_ids:
            out[row, token] += settings.bias(generated)
    return out


def test_processor_equals_reflex_bias_through_batch_updates(vllm_module):
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    cls = vllm_logits_processor_class()
    proc = cls(None, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()  # must run before temperature and for greedy requests
    a = CyclicReflexSettings([2, 5], 1.5, 6, shift=0.1, think_end_id=9)
    b = CyclicReflexSettings([3], 4.0, 8, windows=[(2, 6)])

    def params(settings):
        return VLLMSamplingParams(extra_args=None if settings is None else settings.to_extra_args())

    out0, out1, out2, out3 = [1], [4, 4], [], [6, 9, 6]  # output ids; vLLM hands the processor these very lists
    proc.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        (0, params(a), [1, 2], out0), (1, params(b), [1], out1), (2, params(None), [1], out2),
        (3, params(a), [1, 2, 3], out3),
    ]))
    gen = torch.Generator().manual_seed(0)
    live = {0: (a, out0), 1: (b, out1), 3: (a, out3)}  # row 2 has no CyclicReflex; row 3 ended its thinking

    def check(batch_size):
        logits = torch.randn(batch_size, 11, generator=gen)
        expected = _expected(logits, live)
        torch.testing.assert_close(proc.apply(logits.clone()), expected, rtol=0, atol=1e-6)

    check(4)
    for step in range(7):  # vLLM appends sampled tokens to the same lists; update_state(None) between steps
        for ids in (out0, out1, out2, out3):
            ids.append(step)
        proc.update_state(None)
        check(4)
    # remove row 0, move row 3 -> 0 (vLLM's condense), swap rows 0 and 1, add a new request at row 2
    out_new = [1, 1, 1]
    proc.update_state(BatchUpdate(batch_size=3, removed=[0], added=[(2, params(b), [5], out_new)], moved=[
        (3, 0, MoveDirectionality.UNIDIRECTIONAL), (0, 1, MoveDirectionality.SWAP),
    ]))
    live = {1: (a, out3), 0: (b, out1), 2: (b, out_new)}
    check(3)
    out_new.append(0)
    proc.update_state(None)
    check(3)
    proc.update_state(BatchUpdate(batch_size=0, removed=[0, 1, 2], added=[], moved=[]))
    logits = torch.randn(2, 11, generator=gen)
    assert torch.equal(proc.apply(logits.clone()), logits)


def test_validate_params_rejects_bad_requests(vllm_module):
    from vllm import SamplingParams as VLLMSamplingParams

    cls = vllm_logits_processor_class()
    cls.validate_params(VLLMSamplingParams())
    cls.validate_params(VLLMSamplingParams(extra_args={"other": 1}))
    with pytest.raises(ValueError, match="period"):
        cls.validate_params(VLLMSamplingParams(extra_args={EXTRA_ARGS_KEY: {"token_ids": [1], "amplitude": 1.0}}))
    assert request_settings(VLLMSamplingParams()) is None


# ---------------------------------------------------------------- a real engine (tiny model)

REFLECTION_WORDS = ["w", "b"]  # the tiny tokenizer is character-level: single characters are vocabulary entries
PROMPTS = ["What is 3 + 4?", "Hi"]


@pytest.fixture(scope="module")
def tiny(vllm_tiny_model_dir):
    from reasonrl.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(vllm_tiny_model_dir)
    return tokenizer, load_model(vllm_tiny_model_dir).eval()


@pytest.fixture(scope="module")
def engine(vllm_module, vllm_tiny_model_dir, tiny):
    from reasonrl.rollout.vllm_engine import VLLMEngine

    settings = CyclicReflexSettings.from_tokenizer(tiny[0], amplitude=2.0, period=6, words=REFLECTION_WORDS)
    engine = VLLMEngine(vllm_tiny_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 28, max_model_len=256,
                        cyclic_reflex=settings)
    yield engine
    engine.close()


def _hf_greedy(tiny, prompt_ids, settings, max_new_tokens):
    from reasonrl.rollout.hf import HFEngine

    tokenizer, model = tiny
    hf = HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    processors = None if settings is None else [settings.hf_processor(prompt_width=len(prompt_ids))]
    return hf.generate([prompt_ids], SamplingParams(temperature=0.0), [max_new_tokens],
                       logits_processors=processors).completion_ids[0]


def test_vllm_greedy_generation_follows_the_wave(engine, tiny):
    """With a huge amplitude the reflection token wins exactly where the wave is positive, never where it is
    negative (the HF test in test_cyclic_reflex.py, through the engine's own `cyclic_reflex` setting)."""
    tokenizer = tiny[0]
    reflection, period = tokenizer.convert_tokens_to_ids("w"), 8
    kept = engine.cyclic_reflex
    engine.cyclic_reflex = CyclicReflexSettings([reflection], 1e4, period)
    try:
        prompts = [tokenizer(q)["input_ids"] for q in PROMPTS]  # different lengths: p counts generated tokens
        out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0), [16, 16])
    finally:
        engine.cyclic_reflex = kept
    for ids in out.completion_ids:
        assert len(ids) == 16
        for p, token in enumerate(ids):
            delta = triangular_wave(p, amplitude=1e4, period=period)
            if delta > 0:
                assert token == reflection, (p, ids)
            elif delta < 0:
                assert token != reflection, (p, ids)


def test_vllm_matches_hf_engine_in_a_mixed_batch(engine, tiny):
    """A moderate amplitude (the bias competes with the logits): greedy vLLM completions equal HFEngine's with the
    transformers processor, token for token, while a request without CyclicReflex in the same batch stays plain."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    tokenizer = tiny[0]
    settings = engine.cyclic_reflex  # amplitude 2, period 6, reflection tokens "w" and "b"
    prompts = [tokenizer(q)["input_ids"] for q in PROMPTS]
    steps = 20

    def params(extra):
        return VLLMSamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, detokenize=False,
                                  extra_args=extra, output_kind=RequestOutputKind.FINAL_ONLY)

    on = settings.to_extra_args()
    order = [(0, on), (1, None), (1, on), (0, on)]  # (prompt, extra_args) of each request
    results = engine.llm.generate([{"prompt_token_ids": prompts[i]} for i, _ in order],
                                  [params(extra) for _, extra in order], use_tqdm=False)
    got = [list(r.outputs[0].token_ids) for r in results]
    reflex = [_hf_greedy(tiny, p, settings, steps) for p in prompts]
    plain = _hf_greedy(tiny, prompts[1], None, steps)
    assert got == [reflex[0], plain, reflex[1], reflex[0]]
    assert reflex[1] != plain  # the bias changed the greedy path
    assert set(reflex[1]) - set(settings.token_ids)  # ... without taking over every position
