import math

import pytest
import torch

from reasonrl.batch import RolloutBatch
from reasonrl.tiny_model import build_tiny_model
from reasonrl.trainers.step import fixed_logprobs
from reasonrl.trainers.sync_check import (
    WeightSyncError,
    check_weight_sync,
    default_tolerance,
    probability_gaps,
    probe_rows,
)


def test_probability_gaps_by_hand():
    engine = [[math.log(0.5), math.log(0.2)], [math.log(0.9)]]
    trainer = torch.log(torch.tensor([[0.4, 0.2, 1.0], [0.6, 1.0, 1.0]]))  # padding beyond each row is ignored
    gaps = probability_gaps(engine, trainer)
    assert gaps["prob_gap_mean"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert gaps["prob_gap_max"] == pytest.approx(0.3)
    expected_logp = (abs(math.log(0.5 / 0.4)) + 0 + abs(math.log(0.9 / 0.6))) / 3
    assert gaps["logp_gap_mean"] == pytest.approx(expected_logp)


def test_probability_gaps_naive_loop():
    torch.manual_seed(0)
    trainer = torch.log_softmax(torch.randn(3, 6), -1)
    lengths = [6, 2, 4]
    engine = [(trainer[i, :n] + 0.1 * torch.randn(n)).tolist() for i, n in enumerate(lengths)]
    diffs = [abs(math.exp(engine[i][j]) - math.exp(trainer[i, j].item())) for i in range(3) for j in range(lengths[i])]
    gaps = probability_gaps(engine, trainer)
    assert gaps["prob_gap_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert gaps["prob_gap_max"] == pytest.approx(max(diffs), rel=1e-6)


def test_probe_rows_takes_the_longest_non_empty():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert probe_rows(mask, 2).tolist() == [1, 3]
    assert probe_rows(mask, 10).tolist() == [1, 3, 0]
    assert probe_rows(torch.zeros(2, 3, dtype=torch.bool), 2).numel() == 0


def test_default_tolerance_by_dtype():
    assert default_tolerance("float32") < default_tolerance("bfloat16")
    assert default_tolerance("something-else") == default_tolerance("bfloat16")


class ScoringEngine:
    """Stands in for an engine's prompt_logprobs: scores with a given HF model (the unit under test is the check)."""

    def __init__(self, model):
        self.model = model

    def prompt_logprobs(self, prompts, completions):
        out = []
        for prompt, completion in zip(prompts, completions):
            with torch.no_grad():
                logits = self.model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            out.append(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(completion)[:, None])
                       .squeeze(-1).tolist())
        return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from reasonrl.models import load_model

    path = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")
    return load_model(str(path)).eval(), load_model(str(path)).eval()


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return RolloutBatch(prompt_ids=[[1, 10, 11], [1, 12], [1, 13, 14, 15]], completion_ids=ids * mask,
                        completion_mask=mask, rollout_logprobs=None, finish_reasons=["stop"] * 3, group_size=3)


def test_check_passes_when_the_engine_holds_the_trainers_weights(models):
    trainer, engine_model = models
    metrics = check_weight_sync(ScoringEngine(engine_model), trainer, _batch(), pad_id=0, tolerance=1e-6, step=1)
    assert metrics["sync/prob_gap_mean"] < 1e-6 and metrics["sync/logp_gap_mean"] < 1e-5


def test_check_fires_when_the_engine_kept_old_weights(models):
    trainer, engine_model = models
    stale = {n: p.detach().clone() for n, p in engine_model.named_parameters()}
    with torch.no_grad():  # a large-LR step on the trainer only (the sync "did nothing")
        for p in trainer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    try:
        with pytest.raises(WeightSyncError, match="step 7.*not sampling from the current policy"):
            check_weight_sync(ScoringEngine(engine_model), trainer, _batch(), pad_id=0, tolerance=0.002, step=7)
    finally:
        with torch.no_grad():
            for n, p in trainer.named_parameters():
                p.copy_(stale[n])


def test_trainer_side_probe_equals_teacher_forcing(models):
    """The trainer scores probe rows with the same function as the loss (fixed_logprobs at T=1)."""
    trainer, _ = models
    batch = _batch()
    lp, _ = fixed_logprobs(trainer, batch, torch.arange(3), pad_id=0, temperature=1.0, micro_batch_size=3)
    reference = ScoringEngine(trainer).prompt_logprobs(
        batch.prompt_ids, [batch.completion_ids[i, : int(batch.completion_mask[i].sum())].tolist() for i in range(3)])
    for i, row in enumerate(reference):
        torch.testing.assert_close(lp[i, : len(row)].double(), torch.tensor(row, dtype=torch.float64), atol=1e-5, rtol=0)
