"""Mixed precision: the dtype `model.dtype: auto` picks from the hardware's flags, and bf16 autocast over float32
master weights trains like float32 (loss, gradients, optimizer steps within stated tolerances) without rounding small
updates away, where storing the weights in bf16 would.

Tolerances (measured on the tiny model, random weights, AVX512_BF16 CPU): bf16 gradients differ from fp32 by <= 1%
relative (norm), log-probs by <= 0.02; asserted at 3% and 0.06.
"""

import pytest
import torch
from accelerate import Accelerator
from sharding_worker import PAD, algorithm, step_inputs

from reasonrl.config import AlgorithmConfig, LoraConfig, ModelConfig, OptimConfig, SparseAttentionSettings
from reasonrl.models import load_model, load_policy
from reasonrl.precision import Precision, autocast_forward, choose_dtype
from reasonrl.trainers.optimization import build_optimizer, build_scheduler
from reasonrl.trainers.policy import completion_logprobs
from reasonrl.trainers.step import train_on_batch

AVX2_ONLY = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


# ------------------------------------------------------------------------------------------ the dtype choice
@pytest.mark.parametrize("flags, expected", [
    ({**AVX2_ONLY, "avx512_f": True, "avx512_bf16": True}, "bfloat16"),
    ({**AVX2_ONLY, "amx_bf16": True}, "bfloat16"),
    ({**AVX2_ONLY, "avx512_f": True}, "float32"),  # AVX-512 without its BF16 extension: bf16 is emulated
    (AVX2_ONLY, "float32"),
    ({}, "float32"),
])
def test_auto_on_cpu_follows_the_isa_flags(flags, expected):
    chosen = choose_dtype("auto", device_type="cpu", cpu_flags=flags)
    assert chosen.dtype == expected
    assert ("reports AVX512_BF16" in chosen.reason) == bool(flags.get("avx512_bf16"))
    assert chosen.describe().startswith("precision: " + ("bf16 autocast" if expected == "bfloat16" else "float32"))


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cuda_follows_the_devices_bf16_support(cuda_bf16, expected):
    assert choose_dtype("auto", device_type="cuda", cuda_bf16=cuda_bf16, cpu_flags=AVX2_ONLY).dtype == expected


@pytest.mark.parametrize("requested", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_kept_whatever_the_hardware(requested):
    assert choose_dtype(requested, device_type="cpu", cpu_flags=AVX2_ONLY) == Precision(requested, "set by model.dtype")


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="model.dtype='bf16'"):
        choose_dtype("bf16", device_type="cpu")


def test_the_machines_own_flags_come_from_torch():
    from reasonrl.precision import cpu_isa_flags, resolve_precision

    flags = cpu_isa_flags()
    assert "avx512_bf16" in flags and "amx_bf16" in flags
    fast = flags["avx512_bf16"] or flags["amx_bf16"]
    assert resolve_precision("auto", "cpu").dtype == ("bfloat16" if fast else "float32")


# ------------------------------------------------------------------------------------------- autocast forward
def _policy(model_dir: str, dtype: str, model_cfg: ModelConfig | None = None):
    torch.manual_seed(0)
    return load_policy(model_dir, model_cfg or ModelConfig(), compute_dtype=dtype)


def test_autocast_computes_in_bf16_and_keeps_float32_weights_and_gradients(tiny_model_dir):
    model = _policy(tiny_model_dir, "bfloat16")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.float().sum().backward()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert autocast_forward(model, "bfloat16") is model  # idempotent: no second wrapper
    plain = _policy(tiny_model_dir, "float32")
    plain.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    plain(input_ids=ids)
    assert seen[-1] == torch.float32


def test_log_probs_are_float32_and_close_to_the_float32_ones(tiny_model_dir):
    batch, _ = step_inputs(0)
    got = {}
    for dtype in ("float32", "bfloat16"):
        with torch.no_grad():
            got[dtype] = completion_logprobs(_policy(tiny_model_dir, dtype), batch.prompt_ids, batch.completion_ids,
                                             batch.completion_mask, pad_id=PAD)
    mask = batch.completion_mask
    for (a, b) in zip(got["float32"], got["bfloat16"]):
        assert b.dtype == torch.float32
        assert 0 < (a - b)[mask].abs().max() < 0.06  # rounded (so bf16 really ran), but close


def test_generation_runs_under_the_same_autocast(tiny_model_dir):
    from reasonrl.rollout.base import SamplingParams
    from reasonrl.rollout.hf import HFEngine

    model = _policy(tiny_model_dir, "bfloat16")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = HFEngine(model, pad_token_id=PAD, eos_token_ids=[1]).generate([[5, 6, 7]], SamplingParams(n=2, seed=0), [4])
    assert len(out.completion_ids) == 2 and seen and set(seen) == {torch.bfloat16}
    assert all(isinstance(v, float) for row in out.logprobs for v in row)


# -------------------------------------------------------------------------- training: bf16 against float32
def _train(model, steps: int, *, lr: float, algo: AlgorithmConfig, packing: bool = False) -> dict:
    """`steps` train_on_batch calls (AdamW, the trainer's optimizer) on the sharding test's fixed batches."""
    acc = Accelerator(cpu=True)
    optim = OptimConfig(lr=lr, micro_batch_size=3, max_grad_norm=1e9, packing=packing)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=steps, sequences_per_step=8)
    trace = {"grad_norm": [], "entropy": [], "params": []}
    for step in range(steps):
        batch, advantages = step_inputs(step)
        metrics = train_on_batch(model, optimizer, scheduler, acc, batch, advantages, algo=algo, optim=optim,
                                 pad_id=PAD, temperature=1.0, norm_constant=7)
        scheduler.step()
        trace["grad_norm"].append(metrics["optim/grad_norm"])
        trace["entropy"].append(metrics["policy/entropy"])
        trace["params"].append(torch.cat([p.detach().float().reshape(-1).clone() for p in model.parameters()]))
    return trace


VARIANTS = {  # the model / forward options mixed precision must work with
    "plain": (ModelConfig(), False),
    "lora": (ModelConfig(lora=LoraConfig(enabled=True, r=4, alpha=8)), False),
    "gradient_checkpointing": (ModelConfig(gradient_checkpointing=True), False),
    "packing": (ModelConfig(), True),
    "sparse_attention": (ModelConfig(attn_implementation="reasonrl_sparse",
                                     sparse_attention=SparseAttentionSettings(
                                         dense_below=0, vertical_size=4, slash_size=4, sink=1, local_window=2,
                                         last_q=4)), False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_gradients_and_update_match_float32(tiny_model_dir, variant):
    model_cfg, packing = VARIANTS[variant]
    initial = torch.cat([p.detach().reshape(-1).clone()
                         for p in _policy(tiny_model_dir, "float32", model_cfg).parameters()])
    runs = {dtype: _train(_policy(tiny_model_dir, dtype, model_cfg), 1, lr=1e-3, algo=algorithm(), packing=packing)
            for dtype in ("float32", "bfloat16")}
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert bf16["grad_norm"][0] == pytest.approx(fp32["grad_norm"][0], rel=0.03)
    assert bf16["entropy"][0] == pytest.approx(fp32["entropy"][0], rel=0.01)
    step32, step16 = fp32["params"][0] - initial, bf16["params"][0] - initial
    assert torch.linalg.vector_norm(step16 - step32) < 0.3 * torch.linalg.vector_norm(step32)  # Adam: sign flips
    assert torch.nn.functional.cosine_similarity(step16, step32, dim=0) > 0.95  # only where a gradient is ~0


def _update_checks(trace: dict, reference: dict, initial: torch.Tensor, lr: float) -> dict:
    """How a run's 3 steps at a small lr compare with the float32 run's."""
    moved, moved_ref = trace["params"][-1] - initial, reference["params"][-1] - initial
    one_step = torch.linalg.vector_norm(reference["params"][-1] - reference["params"][-2])
    return {
        "gap_below_one_step": bool(torch.linalg.vector_norm(trace["params"][-1] - reference["params"][-1]) < one_step),
        "moved_ratio": float(torch.linalg.vector_norm(moved) / torch.linalg.vector_norm(moved_ref)),
        "elements_moved": float((moved != 0).float().mean()),
        "ref_step_size": float(moved_ref.abs().max() / 3),
    }


def test_bf16_autocast_keeps_small_updates_that_bf16_weights_round_away(tiny_model_dir):
    """lr 1e-5, 3 steps: mixed precision lands within one step's size of the fp32 run and moves as far; a model
    whose weights are stored in bf16 (the naive bf16 run) loses most updates (the contrast shows the check bites)."""
    lr, algo = 1e-5, AlgorithmConfig(num_iterations=1, loss_agg="token_mean")
    initial = torch.cat([p.detach().reshape(-1).clone() for p in _policy(tiny_model_dir, "float32").parameters()])
    fp32 = _train(_policy(tiny_model_dir, "float32"), 3, lr=lr, algo=algo)
    mixed = _train(_policy(tiny_model_dir, "bfloat16"), 3, lr=lr, algo=algo)
    naive = _train(load_model(tiny_model_dir, dtype="bfloat16"), 3, lr=lr, algo=algo)
    ok = _update_checks(mixed, fp32, initial, lr)
    assert ok["ref_step_size"] == pytest.approx(lr, rel=0.01)  # Adam moves each element by ~lr per step
    assert ok["gap_below_one_step"] and 0.97 < ok["moved_ratio"] < 1.03 and ok["elements_moved"] > 0.99
    for a, b in zip(mixed["entropy"], fp32["entropy"]):
        assert a == pytest.approx(b, rel=0.01)
    for a, b in zip(mixed["grad_norm"], fp32["grad_norm"]):
        assert a == pytest.approx(b, rel=0.03)
    bad = _update_checks(naive, fp32, initial.to(torch.bfloat16).float(), lr)
    assert bad["elements_moved"] < 0.5 and not bad["gap_below_one_step"]
