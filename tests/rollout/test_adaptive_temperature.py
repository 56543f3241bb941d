"""Adaptive Temperature Sampling processors: transformers (on the tiny model) and vLLM v1 (driven directly, and in
a real engine on a tiny model)."""

import math
import pickle
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from reasonrl.rl.hapo import EntropyStats, entropy_stats, logits_entropy
from reasonrl.rollout.adaptive_temperature import (
    EXTRA_ARGS_KEY,
    AdaptiveTemperatureLogitsProcessor,
    vllm_extra_args,
    vllm_logits_processor_class,
)
from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.hf import HFEngine


def _ref_temperature(row, stats, tau, t0, sign_mode):
    """T_t by hand for one row of raw logits (python floats)."""
    vals = [v for v in row.double().tolist() if v != -math.inf]
    lse = math.log(sum(math.exp(v) for v in vals))
    ent = -sum(math.exp(v - lse) * (v - lse) for v in vals)
    h = (math.log(max(ent, 1e-6)) - stats.m) / (stats.sigma + 1e-6)
    hh = h * stats.scale_pos if h > 0 else (h if sign_mode == "paper" else abs(h)) * stats.scale_neg
    return t0 * (1 + tau * max(-1.0, min(1.0, hh)))


def _ref_probs(logits, stats, tau, t0, sign_mode):
    temps = torch.tensor([_ref_temperature(row, stats, tau, t0, sign_mode) for row in logits], dtype=torch.float64)
    return torch.softmax(logits.double() / temps[:, None], dim=-1), temps


# ---------------------------------------------------------------- transformers: direct call
@pytest.mark.parametrize("sign_mode", ["paper", "released_code"])
def test_hf_processor_direct_call(sign_mode):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 13, generator=gen) * torch.tensor([0.3, 1, 2, 4, 8])[:, None]
    scores[2, :4] = -math.inf  # masked tokens (bad words, min length) are fine
    stats = entropy_stats(logits_entropy(torch.randn(40, 13, generator=gen) * 3))
    proc = AdaptiveTemperatureLogitsProcessor(stats, tau=0.3, base_temperature=0.7, sign_mode=sign_mode)
    out = proc(torch.zeros(5, 1, dtype=torch.long), scores.clone())
    expected, temps = _ref_probs(scores, stats, 0.3, 0.7, sign_mode)
    # generate() divides by its temperature (0.7) after this processor
    torch.testing.assert_close(torch.softmax(out.double() / 0.7, -1), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(proc.temperatures(scores).double(), temps, atol=1e-6, rtol=0)
    assert torch.isinf(out[2, :4]).all() and out.dtype == scores.dtype
    assert temps.max() - temps.min() > 0.05  # rows really get different temperatures
    # with nothing dividing afterwards: the processor output is logits / T_t itself
    alone = AdaptiveTemperatureLogitsProcessor(stats, tau=0.3, base_temperature=0.7, sign_mode=sign_mode,
                                               sampler_temperature=1.0)
    torch.testing.assert_close(torch.softmax(alone(None, scores).double(), -1), expected, atol=1e-6, rtol=0)


def test_hf_processor_reductions_and_errors():
    scores = torch.randn(3, 8)
    stats = EntropyStats(m=1.0, sigma=0.5, scale_pos=1.0, scale_neg=1.0)
    for proc in (
        AdaptiveTemperatureLogitsProcessor(stats, tau=0.0, base_temperature=0.7),
        AdaptiveTemperatureLogitsProcessor(None, tau=0.2, base_temperature=0.7),
    ):
        assert torch.equal(proc(None, scores), scores)  # factor exactly 0.7 / 0.7 = 1
    proc = AdaptiveTemperatureLogitsProcessor(None, tau=0.2, base_temperature=0.7)
    proc.stats = stats  # the trainer swaps stats in place between steps
    assert not torch.equal(proc(None, scores), scores)
    with pytest.raises(ValueError, match="tau"):
        AdaptiveTemperatureLogitsProcessor(stats, tau=1.5)
    with pytest.raises(ValueError, match="base_temperature"):
        AdaptiveTemperatureLogitsProcessor(stats, tau=0.1, base_temperature=0.0)
    with pytest.raises(ValueError, match="sign_mode"):
        AdaptiveTemperatureLogitsProcessor(stats, tau=0.1, sign_mode="nope")
    with pytest.raises(ValueError, match="sampler_temperature"):
        AdaptiveTemperatureLogitsProcessor(stats, tau=0.1, sampler_temperature=-1.0)
    with pytest.raises(ValueError, match="stats"):
        AdaptiveTemperatureLogitsProcessor([1.0, 1.0, 1.0, 1.0], tau=0.1)


# ---------------------------------------------------------------- transformers: generate on the tiny model
PEAKY_SCALE = 10.0

@pytest.fixture(scope="module")
def peaky_model(tiny_model_dir):
    """The tiny random model with its (tied) output embedding scaled x10, so that next-token entropies spread out
    (measured: 0.8 to 2.0 nats; the raw model is almost uniform over its 100 tokens, x50 is almost deterministic)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(PEAKY_SCALE)
    return model


def _generate(model, *, temperature, processors=None, top_k=0, seed=0, steps=6):
    gen = torch.Generator().manual_seed(123)
    input_ids = torch.randint(3, model.config.vocab_size, (4, 5), generator=gen)
    torch.manual_seed(seed)
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps, min_new_tokens=steps,
        do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0,
        logits_processor=LogitsProcessorList(processors or []), output_scores=True, output_logits=True,
        return_dict_in_generate=True, pad_token_id=model.config.pad_token_id,
    )


def _processor_input(model, raw):
    """What a custom processor receives: the raw logits after HF's built-in processors, which run first. Here that
    is MinNewTokensLengthLogitsProcessor (min_new_tokens = max_new_tokens), which sets EOS to -inf."""
    masked = raw.clone()
    masked[:, model.config.eos_token_id] = -math.inf
    return masked


def _stats_of(model):
    """EntropyStats of the model's own next-token entropies (as the trainer would compute them)."""
    plain = _generate(model, temperature=1.0, seed=99)
    return entropy_stats(logits_entropy(torch.cat(plain.logits)).double())


@pytest.mark.parametrize("t0", [1.0, 0.7])  # 1.0: HF adds no TemperatureLogitsWarper; 0.7: it divides after us
@pytest.mark.parametrize("sign_mode", ["paper", "released_code"])
def test_generate_step_distribution_is_softmax_logits_over_t(peaky_model, t0, sign_mode):
    stats = _stats_of(peaky_model)
    proc = AdaptiveTemperatureLogitsProcessor(stats, tau=0.5, base_temperature=t0, sign_mode=sign_mode)
    out = _generate(peaky_model, temperature=t0, processors=[proc])
    spread = 0.0
    for raw, final in zip(out.logits, out.scores):  # raw logits and the scores after every processor, per step
        raw = _processor_input(peaky_model, raw)
        expected, temps = _ref_probs(raw, stats, 0.5, t0, sign_mode)
        torch.testing.assert_close(torch.softmax(final.double(), -1), expected, atol=1e-5, rtol=0)
        spread = max(spread, (temps.max() - temps.min()).item())
        plain = torch.softmax(raw.double() / t0, -1)
        assert (plain - expected).abs().max() > 1e-3  # the test can tell adapted from plain sampling
    assert spread > 0.1 * t0


def test_generate_top_k_runs_after_the_processor(peaky_model):
    # order: [custom processors] -> temperature -> top-k; so the kept scores are exactly raw / T_t on the raw top 5
    stats = _stats_of(peaky_model)
    proc = AdaptiveTemperatureLogitsProcessor(stats, tau=0.5, base_temperature=0.7)
    out = _generate(peaky_model, temperature=0.7, processors=[proc], top_k=5)
    for raw, final in zip(out.logits, out.scores):
        raw = _processor_input(peaky_model, raw)
        _, temps = _ref_probs(raw, stats, 0.5, 0.7, "paper")
        kept = torch.isfinite(final)
        assert (kept.sum(-1) == 5).all()
        assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, raw.topk(5, dim=-1).indices, True))
        torch.testing.assert_close(final.double()[kept], (raw.double() / temps[:, None])[kept], atol=1e-5, rtol=0)


def test_tau_zero_equals_plain_temperature_sampling(peaky_model):
    stats = _stats_of(peaky_model)
    plain = _generate(peaky_model, temperature=0.7, seed=5)
    for proc in (
        AdaptiveTemperatureLogitsProcessor(stats, tau=0.0, base_temperature=0.7),
        AdaptiveTemperatureLogitsProcessor(None, tau=0.5, base_temperature=0.7),
    ):
        ours = _generate(peaky_model, temperature=0.7, processors=[proc], seed=5)
        assert torch.equal(ours.sequences, plain.sequences)
        for a, b in zip(ours.scores, plain.scores):
            assert torch.equal(a, b)


def test_hf_engine_accepts_the_processor(peaky_model, tiny_model_dir):
    stats = _stats_of(peaky_model)
    engine = HFEngine(peaky_model, pad_token_id=peaky_model.config.pad_token_id,
                      eos_token_ids=[peaky_model.config.eos_token_id])
    proc = AdaptiveTemperatureLogitsProcessor(stats, tau=0.05, base_temperature=1.0)
    out = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=2, temperature=1.0, seed=0), [4, 6],
                          logits_processors=[proc])
    assert len(out.completion_ids) == 4 and all(len(ids) <= 6 for ids in out.completion_ids)


# ---------------------------------------------------------------- vLLM v1: driving the processor class directly
S1 = EntropyStats(m=1.0, sigma=0.5, scale_pos=0.8, scale_neg=0.3)
S2 = EntropyStats(m=0.2, sigma=1.5, scale_pos=2.0, scale_neg=0.6)


def _vparams(temperature, extra):
    from vllm import SamplingParams as VLLMSamplingParams

    return VLLMSamplingParams(temperature=temperature, extra_args=extra or None)


def _check_rows(proc, logits, expectations):
    """expectations: {row: None (untouched) or (stats, tau, T0, sign_mode, sampler_temperature)}."""
    out = proc.apply(logits.clone())
    for row, exp in expectations.items():
        if exp is None:
            assert torch.equal(out[row], logits[row])
            continue
        stats, tau, t0, sign_mode, t_sampler = exp
        t = _ref_temperature(logits[row], stats, tau, t0, sign_mode)
        # vLLM divides by SamplingParams.temperature after this processor
        torch.testing.assert_close(
            torch.softmax(out[row].double() / t_sampler, -1), torch.softmax(logits[row].double() / t, -1),
            atol=1e-6, rtol=0,
        )


def test_vllm_processor_batch_updates(vllm_module):
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    cls = vllm_logits_processor_class()
    proc = cls(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False  # must run before vLLM's temperature division
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 17, generator=gen) * torch.tensor([1.0, 2, 3, 4, 0.5])[:, None]
    a = (S1, 0.3, 0.7, "paper", 0.7)
    b = (S2, 0.2, 1.0, "released_code", 0.9)  # base temperature 1.0 but vLLM divides by 0.9
    requests = [
        (0, _vparams(0.7, vllm_extra_args(S1, tau=0.3, base_temperature=0.7))),
        (1, _vparams(0.7, None)),  # no args: untouched
        (2, _vparams(0.0, vllm_extra_args(S1, tau=0.3, base_temperature=0.7))),  # greedy: untouched
        (3, _vparams(0.9, vllm_extra_args(S2, tau=0.2, base_temperature=1.0, sign_mode="released_code"))),
        (4, _vparams(0.7, vllm_extra_args(S1, tau=0.3, base_temperature=0.7))),  # same args as row 0: one group
    ]
    assert proc.apply(logits.clone()).equal(logits)  # nothing registered yet
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=[(i, p, None, []) for i, p in requests], moved=[]))
    _check_rows(proc, logits, {0: a, 1: None, 2: None, 3: b, 4: a})
    assert len(proc._row_groups()) == 2
    proc.update_state(None)  # no change
    _check_rows(proc, logits, {0: a, 1: None, 2: None, 3: b, 4: a})
    # remove row 4, swap 0 <-> 3
    proc.update_state(BatchUpdate(batch_size=4, removed=[4], added=[], moved=[(0, 3, MoveDirectionality.SWAP)]))
    _check_rows(proc, logits[:4], {0: b, 1: None, 2: None, 3: a})
    # condense: 3 -> 1 (one-way move)
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(3, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    _check_rows(proc, logits[:3], {0: b, 1: a, 2: None})
    # a new request without args replaces row 0
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(0, _vparams(1.0, None), None, [])], moved=[]))
    _check_rows(proc, logits[:3], {0: None, 1: a, 2: None})


def test_vllm_processor_tau_zero_and_no_stats_are_noops(vllm_module):
    from vllm.v1.sample.logits_processor import BatchUpdate

    proc = vllm_logits_processor_class()(None, torch.device("cpu"), False)
    assert vllm_extra_args(None, tau=0.3) == {}
    added = [(0, _vparams(0.7, vllm_extra_args(S1, tau=0.0, base_temperature=0.7)), None, []),
             (1, _vparams(0.7, vllm_extra_args(None, tau=0.3, base_temperature=0.7)), None, [])]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    logits = torch.randn(2, 9)
    assert torch.equal(proc.apply(logits.clone()), logits)
    assert not proc.rows


def test_vllm_validate_params_and_loading(vllm_module):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import (
        LogitsProcessor,
        _load_logitsprocs_by_fqcns,
        validate_logits_processors_parameters,
    )

    cls = vllm_logits_processor_class()
    assert issubclass(cls, LogitsProcessor) and cls is vllm_logits_processor_class()
    fqcn = "reasonrl.rollout.adaptive_temperature:VLLMAdaptiveTemperatureLogitsProcessor"
    assert _load_logitsprocs_by_fqcns([fqcn]) == [cls]
    assert pickle.loads(pickle.dumps(cls)) is cls  # importable by name in another process
    good = vllm_extra_args(S1, tau=0.05)
    assert good[EXTRA_ARGS_KEY]["stats"] == S1.to_list()
    cls.validate_params(_vparams(1.0, good))
    cls.validate_params(_vparams(1.0, None))
    bad = [
        {EXTRA_ARGS_KEY: {**good[EXTRA_ARGS_KEY], "tau": 2.0}},
        {EXTRA_ARGS_KEY: {**good[EXTRA_ARGS_KEY], "sign_mode": "abs"}},
        {EXTRA_ARGS_KEY: {**good[EXTRA_ARGS_KEY], "stats": [1.0, 2.0]}},
        {EXTRA_ARGS_KEY: {**good[EXTRA_ARGS_KEY], "stats": [0.0, -1.0, 1.0, 1.0]}},
        {EXTRA_ARGS_KEY: {"tau": 0.1}},
        {EXTRA_ARGS_KEY: {**good[EXTRA_ARGS_KEY], "typo": 1}},
        {EXTRA_ARGS_KEY: [1, 2]},
    ]
    for extra in bad:
        with pytest.raises(ValueError):
            cls.validate_params(_vparams(1.0, extra))
        with pytest.raises(VLLMValidationError):
            validate_logits_processors_parameters([cls], _vparams(1.0, extra))


def test_module_imports_without_vllm():
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import reasonrl.rollout.adaptive_temperature as m\n"
        "from reasonrl.rl.hapo import EntropyStats\n"
        "assert m.vllm_extra_args(EntropyStats.neutral(), tau=0.1)\n"
        "try:\n    m.vllm_logits_processor_class()\nexcept ImportError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------- vLLM v1: a real engine (tiny model, ~30 s)
@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory):
    """A tiny model vLLM's CPU backend accepts (head size 128 / 4 = 32; it supports >= 32, the default tiny model
    has 8), with the tied output embedding scaled x3: measured next-token entropies 0.95 to 2.0 nats."""
    from transformers import AutoTokenizer

    from reasonrl.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "tiny128", hidden=128)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    out = root / "tiny128-peaky"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def test_vllm_engine_samples_from_adapted_distribution(peaky_model_dir, vllm_module):
    """Processed log-probs returned by vLLM equal log_softmax(logits / T_t) with T_t from the teacher-forced HF
    logits; a request without the args in the same batch gets plain temperature sampling."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    from reasonrl.rl.hapo import adaptive_temperature
    from reasonrl.rollout.vllm_engine import VLLMEngine

    hf = AutoModelForCausalLM.from_pretrained(peaky_model_dir, dtype=torch.float32).eval()
    stats = _stats_of(hf)
    engine = VLLMEngine(peaky_model_dir, dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 28,
                        logits_processors=[vllm_logits_processor_class()])
    try:
        prompt = [5, 6, 7, 8]

        def params(extra, seed):
            # ignore_eos rather than min_tokens: vLLM's built-in min-tokens processor runs before ours and would mask
            # EOS, which the unmasked teacher-forced reference below does not do
            return VLLMSamplingParams(
                temperature=0.7, seed=seed, max_tokens=12, ignore_eos=True, logprobs=0, detokenize=False,
                extra_args=extra, output_kind=RequestOutputKind.FINAL_ONLY,
            )

        adapted_args = vllm_extra_args(stats, tau=0.5, base_temperature=0.7)
        results = engine.llm.generate(
            [{"prompt_token_ids": prompt}] * 2, [params(adapted_args, 1), params(None, 2)], use_tqdm=False
        )
        max_gap = 0.0
        for result, adapted in zip(results, (True, False)):
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            got = torch.tensor([step[tok].logprob for tok, step in zip(ids, completion.logprobs)], dtype=torch.float64)
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
            temps = (
                adaptive_temperature(logits, base_temperature=0.7, stats=stats, tau=0.5).double()
                if adapted else torch.full((len(ids),), 0.7, dtype=torch.float64)
            )
            expected = torch.log_softmax(logits.double() / temps[:, None], -1).gather(-1, torch.tensor(ids)[:, None])
            torch.testing.assert_close(got, expected.squeeze(-1), atol=1e-3, rtol=0)
            if adapted:
                plain = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
                max_gap = (plain - got).abs().max().item()
        assert max_gap > 1e-2  # the adapted request really was sampled at T_t != T0
    finally:
        engine.close()
