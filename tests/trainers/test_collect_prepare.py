"""Dynamic sampling (refill rounds, shortfall policy) and the per-step preparation helpers, on one process."""

import pytest
import torch
from accelerate import Accelerator

from reasonrl.batch import RolloutBatch
from reasonrl.config import D3SConfig, DynamicSamplingConfig
from reasonrl.rl.d3s import select_tokens
from reasonrl.trainers.collect import Scored, dynamic_sampling
from reasonrl.trainers.prepare import (
    d3s_keep_fractions,
    d3s_token_mask,
    gather_valid_values,
    loss_mask_for,
)

G = 2


def fake_round(rewards_per_group, start=0):
    """A Scored of len(rewards_per_group) prompts, each with G samples of the given rewards."""
    p = len(rewards_per_group)
    n = p * G
    ids = torch.arange(1, n * 3 + 1).view(n, 3)
    batch = RolloutBatch(prompt_ids=[[start + i] for i in range(p) for _ in range(G)], completion_ids=ids,
                         completion_mask=torch.ones(n, 3, dtype=torch.bool), rollout_logprobs=torch.zeros(n, 3),
                         finish_reasons=["stop"] * n, group_size=G)
    rewards = torch.tensor([r for group in rewards_per_group for r in group], dtype=torch.float32)
    rows = [{"question": f"q{start + i}", "answer": "1"} for i in range(p)]
    return Scored(rows, batch, [f"t{start + i}" for i in range(n)], rewards, torch.ones(n, dtype=torch.bool),
                  {"accuracy": rewards.tolist()}, errors=1, grader_errors=3)


def test_dynamic_sampling_refills_until_the_batch_is_full():
    rounds = [fake_round([[1, 1], [0, 1], [0, 0]], 0), fake_round([[1, 0], [1, 1], [0.5, 0]], 10)]
    cfg = DynamicSamplingConfig(enabled=True, max_gen_batches=5)
    out, metrics = dynamic_sampling(Accelerator(cpu=True), lambda r: rounds[r], groups_per_rank=3, cfg=cfg)
    assert [row["question"] for row in out.rows] == ["q1", "q10", "q12"]  # only groups with a reward spread
    assert out.rewards.tolist() == [0, 1, 1, 0, 0.5, 0]
    assert out.batch.prompt_ids == [[1], [1], [10], [10], [12], [12]]
    assert out.errors == 2 and out.grader_errors == 6  # the errors of every round, not only of the kept groups
    assert metrics == {"dynamic/gen_rounds": 2.0, "dynamic/prompts_generated": 6.0, "dynamic/groups_kept": 3.0,
                       "dynamic/shortfall": 0.0}


def test_dynamic_sampling_shortfall_trains_on_what_it_found_or_fails():
    rounds = [fake_round([[1, 1], [0, 1]], 0), fake_round([[0, 0], [1, 1]], 10)]
    cfg = DynamicSamplingConfig(enabled=True, max_gen_batches=2, on_shortfall="train")
    out, metrics = dynamic_sampling(Accelerator(cpu=True), lambda r: rounds[r], groups_per_rank=2, cfg=cfg)
    assert [row["question"] for row in out.rows] == ["q1"] and metrics["dynamic/shortfall"] == 1.0
    cfg.on_shortfall = "fail"
    with pytest.raises(RuntimeError, match="found 1 of 2 groups"):
        dynamic_sampling(Accelerator(cpu=True), lambda r: rounds[r], groups_per_rank=2, cfg=cfg)


def test_dynamic_sampling_filters_on_a_named_reward():
    scored = fake_round([[1, 1], [1, 1]])
    scored.per_func["accuracy"] = [1.0, 0.0, 1.0, 1.0]  # only group 0 differs in accuracy
    cfg = DynamicSamplingConfig(enabled=True, max_gen_batches=1, metric="accuracy")
    out, _ = dynamic_sampling(Accelerator(cpu=True), lambda r: scored, groups_per_rank=1, cfg=cfg)
    assert [row["question"] for row in out.rows] == ["q0"]


def test_loss_masks():
    batch = fake_round([[1, 0], [0, 1]])
    batch.batch.finish_reasons = ["stop", "length", "stop", "stop"]
    valid = torch.tensor([True, True, False, True])
    mask = loss_mask_for(batch.batch, valid, mask_truncated=True)
    assert mask.any(-1).tolist() == [True, False, False, True]
    assert loss_mask_for(batch.batch, valid, mask_truncated=False).any(-1).tolist() == [True, True, False, True]


def test_d3s_helpers_on_one_process():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, generator=g)
    entropy = torch.rand(6, 5, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]
    acc = Accelerator(cpu=True)
    got = d3s_token_mask(acc, adv, entropy, mask, keep_fraction=0.4, scope="batch")
    assert torch.equal(got, select_tokens(adv.abs()[:, None] * entropy, mask, keep_fraction=0.4, scope="batch"))
    assert torch.equal(d3s_token_mask(acc, adv, entropy, mask, keep_fraction=1.0, scope="batch"), mask)
    assert gather_valid_values(acc, entropy, mask).numel() == int(mask.sum())
    d3s = D3SConfig(sample_keep_start=0.5, token_keep_start=0.2, ramp_fraction=0.5)
    assert d3s_keep_fractions(d3s, step=0, total_steps=10) == (0.5, 0.2)
    assert d3s_keep_fractions(d3s, step=5, total_steps=10) == (1.0, 1.0)
