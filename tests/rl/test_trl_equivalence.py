"""External check: our losses reproduce TRL 1.13.0's GRPO loss (value and parameter gradients).

TRL's own `GRPOTrainer._compute_loss` (and the `_get_per_token_logps_and_entropies` it calls) runs on a tiny random
Llama, bound to `_TRLLossHarness`, a stand-in carrying only the attributes that code reads; no trainer, dataset,
tokenizer or hub access. TRL is driven as in training: gradient accumulation over equal micro-batches, with
`num_items_in_batch` for "dapo". Our side computes the same logits, then `token_logprobs_and_entropy`,
`clipped_surrogate`, `kl_estimate("k3")`, `aggregate_loss` and `entropy_term`, over the whole batch or over
micro-batches of any sizes, each normalized by the global counts, with the losses summed (as the trainer does).

Mapping (peers.md §2.1.5): grpo = seq_mean_token_mean (S = all rows, fully masked ones included: aggregate_loss's
convention), dapo = token_mean (K = tokens of the generation batch), dr_grpo = constant (S = all rows,
C = max_completion_length), bnpo = token_mean over the local micro-batch
(equal to ours only with one micro-batch), TRL `delta` = our `dual_clip` (equal when delta >= 1 + epsilon_high),
TRL's entropy bonus = token mean for every loss_type = `entropy_term(mode="token_mean")`.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from reasonrl.rl.losses import aggregate_loss, clipped_surrogate, entropy_term, kl_estimate, token_logprobs_and_entropy

TRL_VERSION = "1.13.0"


def _import_grpo_trainer():
    """Imports TRL's GRPOTrainer without importing vLLM (a vLLM install, if any, is unused here and makes the import
    several times slower). TRL decides at import time through `trl.import_utils.is_vllm_available`; the modules
    imported meanwhile (trl.generation.*) keep seeing 'no vLLM' in this process, which no other test relies on."""
    import trl
    from trl import import_utils

    if trl.__version__ != TRL_VERSION:
        pytest.fail(f"this check pins trl=={TRL_VERSION} (pyproject dev extra), found {trl.__version__}")
    saved = import_utils.is_vllm_available
    import_utils.is_vllm_available = lambda min_version=None: False
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    finally:
        import_utils.is_vllm_available = saved
    return GRPOTrainer


GRPOTrainer = _import_grpo_trainer()


class _Accelerator:
    """Single process: gather/reduce are identities."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


class _TRLLossHarness:
    """TRL's loss code bound to just the attributes it reads (TRL 1.13.0, loss types grpo/bnpo/dr_grpo/dapo)."""

    _compute_loss = GRPOTrainer._compute_loss
    _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies

    def __init__(self, model, *, loss_type, epsilon, epsilon_high, beta, temperature, max_completion_length,
                 grad_accum, entropy_coef=0.0, delta=None):
        self.model = model
        self.model_kwarg_keys = inspect.signature(model.forward).parameters.keys()
        self.loss_type = loss_type
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high
        self.beta = beta
        self.temperature = temperature
        self.max_completion_length = max_completion_length
        self.current_gradient_accumulation_steps = grad_accum
        self.args = SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=grad_accum)
        self.accelerator = _Accelerator()
        self.importance_sampling_level = "token"
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = False
        self.entropy_coef = entropy_coef
        self.use_adaptive_entropy = False
        self._entropy_bonus_enabled = entropy_coef != 0.0
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


B, P, T, VOCAB, MAX_COMPLETION_LENGTH, TEMPERATURE = 6, 4, 6, 40, 10, 0.7


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config).double().train()


@pytest.fixture(scope="module")
def setup(model):
    return model, _inputs(model, [6, 2, 5, 1, 4, 3])  # uneven completions


@pytest.fixture(scope="module")
def masked_setup(model):
    # rows 1 and 4 fully masked (a failed reward, a dropped or truncated sample): they count in S as TRL's do
    return model, _inputs(model, [6, 0, 5, 1, 0, 3])


def _inputs(model, lengths):
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, VOCAB, (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding, as TRL's prompts have
    prompt_ids[1, :2] = 0
    lengths = torch.tensor(lengths)
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids = torch.randint(1, VOCAB, (B, T), generator=gen) * completion_mask
    with torch.no_grad():
        logp0, _ = _our_logp_entropy(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    old = logp0 + 0.6 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # ratios far from 1: clipping
    ref = logp0 + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    advantages = torch.tensor([1.2, -0.7, 0.0, -1.5, 0.4, -0.3], dtype=torch.float64)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum(),
    }
    return inputs


def _our_logp_entropy(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Same forward as TRL (prompt + completion, no position ids); logits at P-1 .. P+T-2 predict the completion."""
    out = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                attention_mask=torch.cat([prompt_mask, completion_mask], 1), use_cache=False)
    logits = out.logits[:, prompt_ids.shape[1] - 1 : -1]
    return token_logprobs_and_entropy(logits, completion_ids, chunk_size=5, temperature=TEMPERATURE)


def _grads(model):
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _run_trl(model, inputs, *, grad_accum, **kw):
    """TRL over `grad_accum` equal micro-batches (backward on each, as the HF Trainer does); returns the summed
    loss, the gradients and TRL's logged metrics."""
    harness = _TRLLossHarness(model, grad_accum=grad_accum, temperature=TEMPERATURE,
                              max_completion_length=MAX_COMPLETION_LENGTH, **kw)
    total, size = 0.0, B // grad_accum
    for s in range(0, B, size):
        micro = {k: (v[s : s + size] if v.dim() else v) for k, v in inputs.items()}
        loss = harness._compute_loss(model, micro)
        loss.backward()
        total += loss.item()
    return total, _grads(model), harness._metrics["train"]


OUR_MODE = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "constant", "bnpo": "token_mean"}


def _slices(sizes):
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _run_ours(model, inputs, *, loss_type, epsilon, epsilon_high, beta, entropy_coef=0.0, delta=None,
              entropy_mode=None, grad_accum=1, micro_batches=(B,)):
    """Our loss over micro-batches of the given sizes (default: the whole batch at once), each normalized by the
    global counts (K = valid tokens, S = all B rows) and summed, with a backward per micro-batch; clip metrics over
    TRL's `grad_accum` equal micro-batches for comparison."""
    mask = inputs["completion_mask"].bool()
    mode = OUR_MODE[loss_type]
    # one call on the whole batch relies on the default S = mask.shape[0] (all rows); micro-batches pass it
    counts = {"num_tokens": mask.sum(), "num_sequences": B if len(micro_batches) > 1 else None}
    total = 0.0
    for sl in _slices(micro_batches):
        logp, ent = _our_logp_entropy(model, inputs["prompt_ids"][sl], inputs["prompt_mask"][sl],
                                      inputs["completion_ids"][sl], inputs["completion_mask"][sl])
        per_token, _ = clipped_surrogate(logp, inputs["old_per_token_logps"][sl], inputs["advantages"][sl],
                                         eps_low=epsilon, eps_high=epsilon_high, mask=mask[sl], dual_clip=delta)
        if beta:
            per_token = per_token + beta * kl_estimate(logp, inputs["ref_per_token_logps"][sl], "k3")
        loss = aggregate_loss(per_token, mask[sl], mode=mode, norm_constant=MAX_COMPLETION_LENGTH, **counts)
        if entropy_coef:
            loss = loss - entropy_coef * entropy_term(ent, mask[sl], mode=entropy_mode or mode, **counts)
        loss.backward()
        total += loss.item()
    with torch.no_grad():
        logp, _ = _our_logp_entropy(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                    inputs["completion_mask"])
    metrics = defaultdict(list)
    for sl in _slices([B // grad_accum] * grad_accum):
        _, m = clipped_surrogate(logp[sl], inputs["old_per_token_logps"][sl], inputs["advantages"][sl],
                                 eps_low=epsilon, eps_high=epsilon_high, mask=mask[sl], dual_clip=delta)
        metrics["low"].append(m["clip/low_frac"].item())
        metrics["high"].append(m["clip/high_frac"].item())
        metrics["dual"].append(m["clip/dual_frac"].item())
    return total, _grads(model), metrics


def _compare(trl_out, our_out):
    (t_loss, t_grads, t_metrics), (o_loss, o_grads, o_metrics) = trl_out, our_out
    assert o_loss == pytest.approx(t_loss, rel=1e-9, abs=1e-12)
    assert any(g.abs().max() > 0 for g in t_grads)
    for name_grad in zip(t_grads, o_grads):
        torch.testing.assert_close(name_grad[1], name_grad[0], rtol=1e-7, atol=1e-10)
    assert t_metrics["clip_ratio/low_mean"] == pytest.approx(o_metrics["low"], abs=1e-12)
    assert t_metrics["clip_ratio/high_mean"] == pytest.approx(o_metrics["high"], abs=1e-12)
    assert max(o_metrics["low"]) > 0 and max(o_metrics["high"]) > 0  # the case really exercises both clips


CASES = [
    # loss_type, epsilon, epsilon_high, beta, grad_accum
    ("grpo", 0.2, 0.2, 0.0, 2),
    ("grpo", 0.2, 0.28, 0.04, 2),
    ("dapo", 0.2, 0.28, 0.0, 2),
    ("dapo", 0.2, 0.28, 0.04, 3),
    ("dr_grpo", 0.2, 0.28, 0.0, 2),
    ("dr_grpo", 0.2, 0.2, 0.04, 3),
    ("bnpo", 0.2, 0.28, 0.04, 1),
]


@pytest.mark.parametrize("loss_type, epsilon, epsilon_high, beta, grad_accum", CASES)
def test_matches_trl_loss_and_grads(setup, loss_type, epsilon, epsilon_high, beta, grad_accum):
    model, inputs = setup
    kw = {"loss_type": loss_type, "epsilon": epsilon, "epsilon_high": epsilon_high, "beta": beta}
    _compare(_run_trl(model, inputs, grad_accum=grad_accum, **kw), _run_ours(model, inputs, grad_accum=grad_accum,
                                                                              **kw))


def test_trl_delta_is_our_dual_clip(setup):
    model, inputs = setup
    kw = {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0, "delta": 1.5}
    trl_out = _run_trl(model, inputs, grad_accum=2, **kw)
    ours = _run_ours(model, inputs, grad_accum=2, **kw)
    _compare(trl_out, ours)
    assert max(ours[2]["dual"]) > 0  # the cap is active on some negative-advantage token
    no_cap = _run_ours(model, inputs, **{**kw, "delta": None})
    assert no_cap[0] != pytest.approx(ours[0])


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
def test_entropy_bonus_matches_trl(setup, loss_type):
    # TRL's bonus is a token mean over the micro-batch / GA for every loss_type: with one micro-batch that is our
    # entropy_term(mode="token_mean") (our default for dapo/bnpo; for grpo we would use the sequence mean).
    model, inputs = setup
    kw = {"loss_type": loss_type, "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.04, "entropy_coef": 0.05}
    _compare(_run_trl(model, inputs, grad_accum=1, **kw), _run_ours(model, inputs, entropy_mode="token_mean", **kw))


MASKED_CASES = [
    # loss_type, beta, TRL's grad_accum, our micro-batch sizes (any split: each normalized by the global counts)
    ("grpo", 0.0, 1, (6,)),
    ("grpo", 0.04, 1, (1, 2, 3)),
    ("grpo", 0.04, 2, (2, 4)),
    ("grpo", 0.0, 3, (1, 1, 1, 1, 1, 1)),
    ("dr_grpo", 0.0, 1, (6,)),
    ("dr_grpo", 0.04, 2, (3, 1, 2)),
    ("dr_grpo", 0.04, 3, (5, 1)),
    ("dapo", 0.04, 1, (2, 2, 2)),
    ("dapo", 0.0, 3, (4, 2)),
    ("bnpo", 0.04, 1, (1, 5)),  # bnpo normalizes per micro-batch: equal to ours only for TRL's single batch
]


@pytest.mark.parametrize("loss_type, beta, grad_accum, micro_batches", MASKED_CASES)
def test_fully_masked_rows_and_micro_batches_match_trl(masked_setup, loss_type, beta, grad_accum, micro_batches):
    # TRL's grpo is the mean over ALL rows of the per-row token means (a fully masked row adds 0) and its dr_grpo
    # divides by B * max_completion_length: the fully masked rows count in S. Our micro-batch losses, summed,
    # reproduce TRL's loss and gradients for any split into micro-batches.
    model, inputs = masked_setup
    assert (inputs["completion_mask"].sum(-1) == 0).sum() == 2
    kw = {"loss_type": loss_type, "epsilon": 0.2, "epsilon_high": 0.28, "beta": beta}
    _compare(_run_trl(model, inputs, grad_accum=grad_accum, **kw),
             _run_ours(model, inputs, grad_accum=grad_accum, micro_batches=micro_batches, **kw))
