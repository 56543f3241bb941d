import pytest
import torch

from reasonrl.rollout.base import RolloutOutput, SamplingParams
from reasonrl.rollout.hf import HFEngine
from reasonrl.rollout.stops import cut_at_stop_strings, stop_cut

ALPHABET = "abcdefghij"


def decode(ids):
    return "".join(ALPHABET[i] for i in ids)


def naive_cut(ids, stops):
    for k in range(1, len(ids) + 1):
        if any(s in decode(ids[:k]) for s in stops):
            return k
    return None


def test_stop_cut_by_hand():
    ids = [0, 1, 2, 3, 2, 3]  # "abcdcd"
    assert stop_cut(ids, decode, ["cd"]) == 4  # "abcd": the token that completes the first "cd"
    assert stop_cut(ids, decode, ["x"]) is None
    assert stop_cut(ids, decode, ["dc", "b"]) == 2  # the earliest of several stop strings
    assert stop_cut(ids, decode, []) is None
    assert stop_cut([], decode, ["a"]) is None


def test_stop_cut_matches_a_naive_scan():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, len(ALPHABET), (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen).tolist()
        stops = ["".join(ALPHABET[i] for i in torch.randint(0, 4, (n,), generator=gen).tolist()) for n in (1, 2)]
        assert stop_cut(ids, decode, stops) == naive_cut(ids, stops)


def test_cut_at_stop_strings_trims_everything_in_place():
    out = RolloutOutput([[0, 1, 2, 3], [4, 5]], [[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0]], ["length", "length"],
                        [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0]])
    cut_at_stop_strings(out, ["bc"], decode)
    assert out.completion_ids == [[0, 1, 2], [4, 5]]
    assert out.logprobs == [[-1.0, -2.0, -3.0], [-5.0, -6.0]]
    assert out.entropies == [[1.0, 2.0, 3.0], [5.0, 6.0]]
    assert out.finish_reasons == ["stop", "length"]


def assert_stops_respected(out, tokenizer, stops, budget):
    assert any(reason == "stop" for reason in out.finish_reasons)  # the test can tell
    for ids, logp, reason in zip(out.completion_ids, out.logprobs, out.finish_reasons):
        assert len(logp) == len(ids) <= budget
        text = tokenizer.decode(ids, skip_special_tokens=False)
        body = tokenizer.decode(ids[:-1], skip_special_tokens=False)
        assert not any(s in body for s in stops)  # nothing before the last token completes a stop string
        if reason == "length":
            assert len(ids) == budget and not any(s in text for s in stops)


def test_hf_engine_stops_on_strings(tiny_model_dir):
    from reasonrl.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    stops = ("a", "e", "7")
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id],
                      tokenizer=tokenizer)
    params = SamplingParams(n=6, temperature=1.0, seed=3, stop=stops)
    out = engine.generate([[1, 40, 41], [1, 50]], params, [30, 30])
    assert_stops_respected(out, tokenizer, stops, 30)
    with pytest.raises(ValueError, match="tokenizer"):
        HFEngine(model, pad_token_id=0, eos_token_ids=[2]).generate([[1, 40]], params, [5])


def test_vllm_engine_stops_on_strings(vllm_module, vllm_tiny_model_dir):
    from reasonrl.models import load_tokenizer
    from reasonrl.rollout.vllm_engine import VLLMEngine

    tokenizer = load_tokenizer(vllm_tiny_model_dir)
    stops = ("a", "e", "7")
    engine = VLLMEngine(vllm_tiny_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 28)
    try:
        out = engine.generate([[1, 40, 41], [1, 50]], SamplingParams(n=6, temperature=1.0, seed=3, stop=stops),
                              [30, 30])
    finally:
        engine.close()
    assert_stops_respected(out, tokenizer, stops, 30)
