"""train_on_batch against a naive per-row loop, for several micro-batch sizes, with and without a KL term."""


import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.batch import RolloutBatch
from reasonrl.config import AlgorithmConfig, OptimConfig
from reasonrl.trainers.step import group_stats, split_micro_batches, train_on_batch, trainable_rows

PAD = 0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(cfg)


def make_batch(seed=0, rows=6, width=5):
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randint(1, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (rows // 2,), generator=g)]
    prompts = [p for p in groups for _ in range(2)]  # two samples per prompt, as GRPO groups share prompts
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    ids = torch.randint(1, 40, (rows, width), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    return RolloutBatch(prompt_ids=prompts, completion_ids=ids.masked_fill(~mask, PAD), completion_mask=mask,
                        rollout_logprobs=None, finish_reasons=["stop"] * rows, group_size=2)


def naive_grads(model, batch, adv, *, temperature, kl_coef=0.0, ref=None):
    """Per row: unpadded forward, full log-softmax; loss = sum_t(-A * ratio + kl_coef * k3) / all valid tokens."""
    total = batch.completion_mask.sum()
    model.zero_grad()
    for i in range(batch.num_rows):
        n = int(batch.completion_mask[i].sum())
        seq = torch.tensor(batch.prompt_ids[i] + batch.completion_ids[i, :n].tolist())[None]
        p = len(batch.prompt_ids[i])
        logits = model(input_ids=seq).logits[0, p - 1 : p - 1 + n] / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, seq[0, p:, None]).squeeze(-1)
        loss = -(adv[i] * torch.exp(logp - logp.detach())).sum()
        if kl_coef:
            with torch.no_grad():
                ref_logits = ref(input_ids=seq).logits[0, p - 1 : p - 1 + n] / temperature
                ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, seq[0, p:, None]).squeeze(-1)
            d = ref_logp - logp
            loss = loss + kl_coef * (torch.exp(d) - d - 1).sum()
        (loss / total).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def step_with_sgd(model, batch, adv, *, micro, temperature, kl_coef=0.0, ref=None):
    """One train_on_batch call with SGD(lr=1) and no clipping: the parameter change is minus the gradient."""
    acc = Accelerator(cpu=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics = train_on_batch(
        model, opt, sched, acc, batch, adv, algo=AlgorithmConfig(kl_coef=kl_coef),
        optim=OptimConfig(micro_batch_size=micro, max_grad_norm=1e9), pad_id=PAD, temperature=temperature,
        ref_model=ref,
    )
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}, metrics


@pytest.mark.parametrize("micro", [1, 2, 6])
def test_gradient_matches_a_naive_loop_for_any_micro_batch_size(micro):
    batch = make_batch()
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])  # a zero-advantage group is skipped, not lost
    reference = naive_grads(tiny_model(), batch, adv, temperature=0.7)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=0.7)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["train/tokens"] == float(batch.completion_mask[[0, 1, 4, 5]].sum())


def test_kl_term_matches_a_naive_loop():
    batch = make_batch(seed=3)
    adv = torch.tensor([0.3, -0.3, 0.0, 0.0, 1.0, -1.0])
    ref = tiny_model(seed=1).eval()
    reference = naive_grads(tiny_model(), batch, adv, temperature=1.0, kl_coef=0.1, ref=ref)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=4, temperature=1.0, kl_coef=0.1, ref=ref)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["policy/kl"] > 0  # every row is trained when a KL term is on


def test_all_zero_advantages_skip_the_optimizer_step():
    batch = make_batch()
    got, metrics = step_with_sgd(tiny_model(), batch, torch.zeros(6), micro=2, temperature=1.0)
    assert metrics["train/skipped"] == 1.0
    assert all(torch.count_nonzero(delta) == 0 for delta in got.values())


def test_nan_advantage_raises_a_clear_error():
    batch = make_batch()
    adv = torch.tensor([float("nan"), 1.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        step_with_sgd(tiny_model(), batch, adv, micro=6, temperature=1.0)


def test_trainable_rows_and_split():
    adv = torch.tensor([1.0, 0.0, -1.0, 2.0])
    mask = torch.tensor([[True], [True], [False], [True]])
    assert trainable_rows(adv, mask, all_rows=False).tolist() == [0, 3]
    assert trainable_rows(adv, mask, all_rows=True).tolist() == [0, 1, 3]
    chunks = split_micro_batches(torch.tensor([0, 3, 5]), 2, 3)
    assert [c.tolist() for c in chunks] == [[0, 3], [5], []]


def test_group_stats_hand_computed():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    stats = group_stats(rewards, torch.ones(4, dtype=torch.bool), 2)
    assert stats["reward/mean"] == 0.75 and stats["reward/zero_std_frac"] == 0.5
    stats = group_stats(rewards, torch.tensor([True, True, False, True]), 2)  # group 2 has one valid sample
    assert stats["reward/mean"] == 1.0 and stats["reward/zero_std_frac"] == 1.0
