"""`attn_implementation="reasonrl_sparse"` in a stock transformers Llama, and through the trainer."""

from pathlib import Path

import pytest
import torch

from reasonrl.kernels import attention as sparse_attention_module
from reasonrl.kernels.hf import sparse_config_from_settings
from reasonrl.models import load_model

ALL_KEEP = {"dense_below": 0, "block_size": 8, "last_q": 4, "vertical_size": 10**6, "slash_size": 10**6}
SPARSE = {"dense_below": 0, "block_size": 8, "last_q": 4, "vertical_size": 2, "slash_size": 3, "sink": 1,
          "local_window": 2}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    def make(settings=None):
        if settings is None:
            return load_model(tiny_model_dir, attn_implementation="sdpa")
        return load_model(tiny_model_dir, attn_implementation="reasonrl_sparse", sparse_attention=settings)

    return make


def tokens(batch=2, length=50, seed=0):
    torch.manual_seed(seed)
    return torch.randint(3, 60, (batch, length))


def test_all_keep_pattern_matches_sdpa_logits_and_gradients(models):
    sdpa, sparse = models(), models(ALL_KEEP)
    assert sparse.config._attn_implementation == "reasonrl_sparse"
    ids = tokens()
    a, b = sdpa(ids).logits, sparse(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(sdpa.named_parameters(), sparse.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_a_sparse_pattern_changes_the_logits(models):
    ids = tokens()
    assert not torch.allclose(models()(ids).logits, models(SPARSE)(ids).logits, atol=1e-3)


def test_padding_packing_and_generation_match_sdpa(models):
    sdpa, sparse = models(), models(ALL_KEEP)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :10] = 0  # left padding
    a, b = sdpa(ids, attention_mask=mask).logits, sparse(ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)
    # packed row: two sequences of 20 and 30 tokens, position ids restarting at 0
    packed = sparse(ids[:1], position_ids=torch.cat([torch.arange(20), torch.arange(30)])[None]).logits
    assert torch.allclose(packed[0, :20], sdpa(ids[:1, :20]).logits[0], atol=1e-5)
    assert torch.allclose(packed[0, 20:], sdpa(ids[:1, 20:]).logits[0], atol=1e-5)
    # KV-cache decoding (dense for the new token) after a sparse prefill
    prompt = ids[:, :20]
    greedy = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(sdpa.generate(prompt, **greedy), sparse.generate(prompt, **greedy))


def test_bad_settings_name_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="vertical_sise"):
        sparse_config_from_settings({"vertical_sise": 3})
    with pytest.raises(ValueError, match="impl"):
        load_model(tiny_model_dir, attn_implementation="reasonrl_sparse", sparse_attention={"impl": "flash"})


def test_the_trainer_trains_with_sparse_attention(tiny_model_dir, tmp_path, monkeypatch):
    """A short GRPO run through the normal entry point; the sparse path (pattern + reference) really runs."""
    from reasonrl.trainers import grpo

    calls = []
    original = sparse_attention_module.attention_with_pattern

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(sparse_attention_module, "attention_with_pattern", counting)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "trainers"))  # rewards_for_tests
    settings = {"model.attn_implementation": "reasonrl_sparse", "model.sparse_attention.dense_below": 8,
                "model.sparse_attention.block_size": 8, "model.sparse_attention.last_q": 4,
                "model.sparse_attention.vertical_size": 4, "model.sparse_attention.slash_size": 8,
                "model.sparse_attention.sink": 2, "model.sparse_attention.local_window": 4, "optim.packing": True}
    args = {"model.name_or_path": tiny_model_dir, "data.num_train": 16, "data.num_eval": 2,
            "rewards": "[{name: 'rewards_for_tests:digit_count'}]", "rollout.group_size": 4,
            "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 6, "optim.lr": 1e-3, "trainer.steps": 2,
            "trainer.output_dir": str(tmp_path), "trainer.eval_every": 0, "trainer.eval_max_new_tokens": 4,
            "logging.wandb_mode": "disabled", **settings}
    assert grpo.main([f"{k}={v}" for k, v in args.items()]) == 0
    assert calls and min(calls) >= 8  # sequences of >= dense_below tokens went through the sparse path
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"loss/policy"' in rows[-1]
