"""LoRA (model.lora): merged weights for the engines, the base model as the reference, adapter-only checkpoints."""

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from reasonrl.config import ConfigError, LoraConfig, load_config
from reasonrl.models import load_model
from reasonrl.trainers import grpo, validation
from reasonrl.trainers.checkpoint import latest_checkpoint, list_checkpoints
from reasonrl.trainers.lora import (
    ADAPTER_DIR,
    DisabledAdapterReference,
    apply_lora,
    load_adapters,
    merged_named_parameters,
    save_adapters,
)
from reasonrl.trainers.policy import completion_logprobs


@pytest.fixture(autouse=True)
def _test_rewards(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # rewards_for_tests


def lora_model(model_dir, seed=0, **spec):
    """The tiny model with adapters whose B is random (peft starts B at zero: a no-op adapter)."""
    model = apply_lora(load_model(model_dir), LoraConfig(enabled=True, r=4, alpha=8, **spec))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def test_only_adapters_require_grad(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)


@pytest.mark.parametrize("targets", [None, ["all-linear"]])
def test_merged_parameters_equal_merge_and_unload_and_leave_the_model_alone(tiny_model_dir, targets):
    model = lora_model(tiny_model_dir, **({} if targets is None else {"target_modules": targets}))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    merged = list(merged_named_parameters(model))
    expected = list(copy.deepcopy(model).merge_and_unload().named_parameters())
    plain_names = [name for name, _ in load_model(tiny_model_dir).named_parameters()]
    assert [name for name, _ in merged] == [name for name, _ in expected] == plain_names
    for (name, got), (_, want) in zip(merged, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    changed = {name for (name, got), (_, base) in zip(merged, load_model(tiny_model_dir).named_parameters())
               if not torch.equal(got, base)}
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" not in changed
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())  # nothing merged in place
    assert not any(getattr(m, "merged", False) for m in model.modules())


def _logprobs(model, tokenizer_free_rows=((3, 4, 5), (3, 4, 5), (6, 7))):
    prompts = [list(p) for p in tokenizer_free_rows]
    completions = torch.tensor([[10, 11, 12], [13, 14, 0], [15, 16, 17]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, prompts, completions, mask, pad_id=0)
    return logp * mask


def test_reference_with_adapters_off_is_the_base_model(tiny_model_dir):
    base = load_model(tiny_model_dir)
    policy = lora_model(tiny_model_dir, dropout=0.5)  # dropout on: apply_lora puts the policy in train mode
    assert policy.training
    reference = DisabledAdapterReference(policy)
    torch.testing.assert_close(_logprobs(reference), _logprobs(base))
    assert not torch.allclose(_logprobs(policy.eval()), _logprobs(base), atol=1e-3)  # the adapters matter
    policy.train()
    _logprobs(reference)
    assert policy.training  # the reference pass restores the mode, the adapters and their requires_grad
    assert all(p.requires_grad for name, p in policy.named_parameters() if "lora_" in name)
    assert not any(m.disable_adapters for m in policy.modules() if isinstance(m, LoraLayer))


def test_adapters_round_trip_and_a_mismatch_fails(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir, seed=1)
    save_adapters(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    fresh = apply_lora(load_model(tiny_model_dir), LoraConfig(enabled=True, r=4, alpha=8))
    load_adapters(fresh, tmp_path / "adapter")
    for (name, want), (_, got) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(want, got), name
    fewer = apply_lora(load_model(tiny_model_dir), LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="do not match model.lora"):
        load_adapters(fewer, tmp_path / "adapter")


@pytest.mark.parametrize("override, key", [
    ("model.lora.r=0", "model.lora.r"), ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"), ("model.lora.target_modules=[]", "model.lora.target_modules"),
])
def test_bad_lora_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validation.validate(load_config(None, [override]), world_size=1)


def lora_overrides(model_dir, out_dir, steps, **extra):
    base = {
        "model.name_or_path": model_dir, "model.lora.enabled": "true", "model.lora.r": 4, "model.lora.alpha": 8,
        "algorithm.kl_coef": 0.1, "data.num_train": 32, "data.num_eval": 4,
        "rewards": "[{name: 'rewards_for_tests:digit_count'}]",
        "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 6,
        "optim.lr": 1e-2, "optim.micro_batch_size": 3, "trainer.steps": steps, "trainer.output_dir": str(out_dir),
        "trainer.save_every": 1, "trainer.keep_last": 5, "trainer.eval_every": 0, "trainer.eval_at_start": "false",
        "trainer.eval_max_new_tokens": 4, "logging.wandb_mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def history(out_dir):
    return {row["step"]: row for row in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())}


def test_lora_training_changes_only_adapters_saves_only_adapters_and_resumes(tiny_model_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    random.seed(0)  # as grpo.main does
    trainer = grpo.GRPOTrainer(load_config(None, lora_overrides(tiny_model_dir, full, 3)))
    try:
        trainer.run()
        assert isinstance(trainer.ref_model, DisabledAdapterReference)  # no second model loaded
        base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
        trained = dict(trainer.policy.get_base_model().named_parameters())
        frozen = {name.replace(".base_layer.", "."): p for name, p in trained.items() if "lora_" not in name}
        assert frozen.keys() == base.keys()
        assert [name for name in base if not torch.equal(base[name], frozen[name])] == []
        lora_b = [p for name, p in trained.items() if "lora_B" in name]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every adapter learned something
    finally:
        trainer.close()
    rows = history(full)
    assert rows[1]["policy/kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the adapters are still zero
    assert rows[3]["policy/kl"] > 0

    last = latest_checkpoint(full)
    assert sorted(p.name for p in last.iterdir() if p.is_dir()) == [ADAPTER_DIR]  # no model/ folder
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (last / ADAPTER_DIR).iterdir()}
    assert not list(last.rglob("model.safetensors"))
    from reasonrl.cli import load_eval_model, resolve_eval_model  # `reasonrl eval <run>` reads the adapters

    assert resolve_eval_model(str(full)) == str(last / ADAPTER_DIR)
    merged = dict(load_eval_model(str(last / ADAPTER_DIR), "float32").named_parameters())
    for name, tensor in merged_named_parameters(trainer.policy):
        torch.testing.assert_close(merged[name], tensor, msg=name)

    assert grpo.main(lora_overrides(tiny_model_dir, cut, 2)) == 0  # "killed" after step 2's checkpoint
    assert grpo.main(lora_overrides(tiny_model_dir, cut, 3, **{"trainer.resume": "auto"})) == 0
    a, b = history(full)[3], history(cut)[3]
    assert b["reward/mean"] == a["reward/mean"]  # the same prompts and samples: adapters and data position restored
    assert b["loss/policy"] == pytest.approx(a["loss/policy"], rel=1e-5, abs=1e-7)
    assert b["policy/kl"] == pytest.approx(a["policy/kl"], rel=1e-4, abs=1e-8)
    assert [p.name for p in list_checkpoints(cut)] == ["step-000001", "step-000002", "step-000003"]


def test_vllm_engine_samples_from_the_merged_weights_also_after_resume(vllm_module, vllm_tiny_model_dir, tmp_path):
    extra = {"rollout.engine": "vllm", "rollout.vllm_kv_cache_bytes": 1 << 28, "trainer.save_every": 1}
    assert grpo.main(lora_overrides(vllm_tiny_model_dir, tmp_path, 1, **extra)) == 0
    assert grpo.main(lora_overrides(vllm_tiny_model_dir, tmp_path, 2, **extra, **{"trainer.resume": "auto"})) == 0
    rows = history(tmp_path)
    for step in (1, 2):
        assert rows[step]["sync/prob_gap_max"] < 1e-3  # the engine scores like the adapted policy after each push
    # step 2 sampled from an engine built from the base model: the resume pushed the merged weights first
    assert rows[2]["sampling/logp_diff_max"] < 1e-3
