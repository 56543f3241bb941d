"""One definition of rollout log-probs and entropies on every engine (reasonrl/rollout/base.py): on the tiny model at
T = 0.7, with top-k / top-p, with HAPO's adaptive temperature and greedily, the hf and vllm engines' rollout log-probs
equal a plain fp32 reference of the distribution each token was drawn from, and the entropies the trainer uses (hf:
returned by the engine; vllm: its own `completion_logprobs` pass) equal the entropy at T = 1, all to 1e-4. The server
engine runs the same check in test_server_engine.py, on that module's server."""

import pytest
import torch
from engine_reference import CASES, assert_matches_reference, raw_logits, reference, row_prompts, trainer_entropies

from reasonrl.rollout.hf import HFEngine

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65]]
BUDGETS = [8, 5, 8]


@pytest.fixture(scope="module")
def model(vllm_tiny_model_dir):
    from reasonrl.models import load_model

    return load_model(vllm_tiny_model_dir, dtype="float32").eval()


@pytest.fixture(scope="module")
def vllm_engine(vllm_module, vllm_tiny_model_dir):
    from reasonrl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(vllm_tiny_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 28, max_model_len=256)
    yield engine
    engine.close()


def hf_engine(model) -> HFEngine:
    config = model.config
    return HFEngine(model, pad_token_id=config.pad_token_id, eos_token_ids=[config.eos_token_id], return_entropy=True)


@pytest.mark.parametrize("case", CASES)
def test_hf_engine_returns_the_defined_logprobs_and_entropies(model, case):
    params = CASES[case]
    out = hf_engine(model).generate(PROMPTS, params, BUDGETS)
    assert_matches_reference(model, PROMPTS, out, params, out.entropies)
    # the trainer's own pass gives the same entropies, so HAPO / D3S see one definition whichever engine sampled
    assert_matches_reference(model, PROMPTS, out, params, trainer_entropies(model, PROMPTS, out, params, pad_id=0))


@pytest.mark.parametrize("case", CASES)
def test_vllm_engine_returns_the_defined_logprobs(vllm_engine, model, case):
    params = CASES[case]
    out = vllm_engine.generate(PROMPTS, params, BUDGETS)
    assert_matches_reference(model, PROMPTS, out, params, trainer_entropies(model, PROMPTS, out, params, pad_id=0))


@pytest.mark.parametrize("case", ["top_k_top_p", "adaptive"])
def test_the_reference_differs_from_plain_logits_over_t(model, case):
    """The reference is not what the old code returned (log_softmax(logits / T0) without truncation or T_t; the
    entropy at T0), so the tests above can fail."""
    params = CASES[case]
    out = hf_engine(model).generate(PROMPTS, params, BUDGETS)
    for prompt, ids in zip(row_prompts(PROMPTS, params.n, len(out.completion_ids)), out.completion_ids):
        logp, entropy = reference(model, prompt, ids, params)
        lsm = torch.log_softmax(raw_logits(model, prompt, ids) / params.temperature, -1)
        assert (logp - lsm.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)).abs().max() > 1e-2
        assert (entropy + (lsm.exp() * lsm).sum(-1)).abs().max() > 1e-2
